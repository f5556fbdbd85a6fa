"""Helpers for the app tests: a small phantom datastore and MONAI Label settings pointing at it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from samora.data import PHANTOM_LABELS, write_phantom_studies

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "samora"


def make_datastore(tmp: Path, n_labeled: int = 2, n_unlabeled: int = 2, shape=(64, 64, 24)) -> dict:
    """Phantom studies in tmp/studies (labels/final for the labelled ones), truth of the rest in tmp/truth."""
    info = write_phantom_studies(
        tmp / "studies", n_labeled=n_labeled, n_unlabeled=n_unlabeled, seed=3, shape=shape, truth_dir=tmp / "truth"
    )
    return {**info, "studies": tmp / "studies", "truth": tmp / "truth"}


def app_conf(tmp: Path, **overrides) -> dict[str, str]:
    """Small, fast app configuration (strings, as MONAI Label passes them)."""
    conf = {
        "preset": "tiny",
        "image_size": "64",
        "labels": json.dumps(PHANTOM_LABELS),
        "epochs": "2",
        "batch_size": "8",
        "ssl_steps": "4",
        "ssl_batch_size": "4",
        "bootstrap": "off",
        "train_every": "0",
        "model_dir": str(tmp / "model"),
        "infer_batch_size": "8",
    }
    conf.update({k: str(v) for k, v in overrides.items()})
    return conf


def shuffled_slicer_label(truth_path: Path, out_path: Path, order: list[str]) -> list[dict]:
    """Re-number a label volume in the viewer's segment order; returns Slicer-style label_info."""
    img = nib.load(str(truth_path))
    data = np.asarray(img.dataobj).astype(np.int16)
    out = np.zeros_like(data)
    info = []
    for viewer_idx, name in enumerate(order, start=1):
        out[data == PHANTOM_LABELS[name]] = viewer_idx
        info.append({"name": name, "idx": viewer_idx})
    nib.save(nib.Nifti1Image(out, img.affine), str(out_path))
    return info
