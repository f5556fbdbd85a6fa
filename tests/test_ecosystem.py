"""Guards against the known breakages of today's packages: each would fail if one came back."""

from __future__ import annotations

import importlib

import pytest


def test_monailabel_app_interface_imports():
    # pydicom 3 removed pydicom._storage_sopclass_uids (used by pydicom-seg): requirements pin pydicom<3.
    import pydicom

    assert int(pydicom.__version__.split(".")[0]) < 3
    importlib.import_module("monailabel.interfaces.app")
    importlib.import_module("dicomweb_client")


def test_torchvision_matches_torch():
    # A torchvision built for another torch fails in its C ops; segment_anything and sam2 import it.
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert kept.tolist() == [0]
    importlib.import_module("monailabel.transform.post")


@pytest.mark.parametrize("module", ["segment_anything", "sam2.build_sam", "peft", "nrrd", "nibabel", "skimage"])
def test_required_packages_import(module):
    importlib.import_module(module)


def test_infer_request_with_image_path_key_does_not_break_our_pipeline(tmp_path):
    # MONAI 1.6 Spacingd crashes on BasicInferTask's string `image_path` key; our infer path does not use it,
    # and extra request keys must not matter.
    from samora.serving.interactive import PromptError, parse_prompt

    with pytest.raises(PromptError, match="foreground point or an roi"):
        parse_prompt({"image_path": str(tmp_path), "label": "liver"}, ["liver"])


def test_no_mlflow_in_our_trainers():
    # MLflow 3 refuses the default file-store URI; our trainers must not depend on BasicTrainTask/MLflow.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "apps" / "samora" / "lib" / "trainers"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "mlflow" not in names and not any("basic_train" in m for m in modules), path
