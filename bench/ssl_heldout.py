"""Stage 1 held-out generalisation: each SSL objective's loss on a study that took no part in training.

For every level (image: contrastive, patch: masked image modelling, pixel: denoising) the expert and its head train
for N steps on the training studies; the script reports the training loss (mean of the first and last n steps,
n = 10 or half a shorter run), the loss on the held-out study at step 0 and at the end (samora.ssl.heldout: fixed
seeds, eval mode, no grad), and the seconds per training step. Issue 12's criterion: held-out end <= 0.9 x step 0
(patch level: on the masked patches; step 0 is the zero-initialised decoder's prediction).

Training studies: the two cropped chest CTs (two crops of ONE scan) and the abdomen CT; held out: the DeepLesion
pelvic CT (another patient).

    python bench/ssl_heldout.py                                 # tiny preset, the test's recipes (minutes)
    python bench/ssl_heldout.py --preset litemedsam --steps 4 --batch-size 2 --heldout-slices 4 --train-slices 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from paths import DATA, ROOT
from records import command_line, machine_info, now_utc, write_json
from report import md_table

from samora.config import EXPERTS, ModelConfig
from samora.data import SliceCache, discover_studies
from samora.engine.precision import TRAIN_PRECISIONS
from samora.model import SamoraModel
from samora.plots import read_loss_log
from samora.ssl import train_expert
from samora.ssl.experts_io import expert_paths
from samora.ssl.trainer import RunHooks, SSLSettings, log_path

TRAIN_FOLDERS = ("ct_chest_totalseg", "ct_abdomen_totalseg")
HELDOUT_FOLDER = "ct_pelvis_deeplesion"
CRITERION = 0.9
# (steps, batch, lr) per level: the tiny preset's are tests/test_ssl.py's RECIPES, the run the test asserts on.
RECIPES = {
    "tiny": {"image": (150, 16, 3e-3), "patch": (400, 16, 3e-3), "pixel": (60, 8, 3e-3)},
    "litemedsam": {"image": (4, 2, 1e-3), "patch": (4, 2, 1e-3), "pixel": (4, 2, 1e-3)},
}
IMAGE_SIZES = {"tiny": 128, "litemedsam": 256}


class SliceSubset:
    """`count` evenly spaced slices of a SliceCache, with its identity (what train_expert and heldout_loss read)."""

    def __init__(self, cache: SliceCache, count: int | None) -> None:
        n = len(cache)
        self.cache = cache
        self.indices = list(range(n)) if count is None or count >= n else _spread(n, count)
        self.study_ids = cache.study_ids
        self.data_hash = cache.data_hash if len(self.indices) == n else f"{cache.data_hash}:{len(self.indices)}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.cache[self.indices[i]]


def _spread(n: int, count: int) -> list[int]:
    return np.unique(np.linspace(0, n - 1, count).round().astype(int)).tolist()


def recipe(args: argparse.Namespace, level: str) -> tuple[int, int, float]:
    """The level's (steps, batch, lr): the preset's default, overridden by the command line."""
    steps, batch, lr = RECIPES.get(args.preset, RECIPES["litemedsam"])[level]
    return args.steps or steps, args.batch_size or batch, args.lr or lr


def run_level(model: SamoraModel, level: str, train: Any, held: Any, args: argparse.Namespace, work: Path) -> dict:
    """Train one level with held-out evaluation; the measured numbers."""
    steps, batch, lr = recipe(args, level)
    settings = SSLSettings(batch_size=batch, lr=lr, heldout_slices=args.heldout_slices, precision=args.precision)
    started = time.perf_counter()
    summary = train_expert(
        model=model,
        level=level,
        cache=train,
        out_dir=work,
        total_steps=steps,
        settings=settings,
        hooks=RunHooks(progress=False),
        heldout=held,
    )
    total = time.perf_counter() - started
    record = summary["heldout"]
    losses = [r["loss"] for r in read_loss_log(log_path(work, level))]
    window = max(1, min(10, len(losses) // 2))  # first and last windows never overlap, even in a short run
    row = {
        "level": level,
        "objective": summary["objective"],
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "train_window": window,
        "train_first": float(np.mean(losses[:window])),
        "train_last": float(np.mean(losses[-window:])),
        "heldout_step0": record["step0_loss"],
        "heldout_end": record["end_loss"],
        "heldout_ratio": record["end_over_step0"],
        "meets_criterion": record["end_over_step0"] <= CRITERION,
        "seconds_per_step": summary["seconds"] / steps,
        "heldout_eval_seconds": (total - summary["seconds"]) / 2,  # two evaluations: step 0 and end
        "heldout_slices": record["n_slices"],
        # what the trainer ran with, read back from the expert file it wrote
        "precision": json.loads(expert_paths(work, level)[1].read_text())["optimisation"]["precision"],
    }
    print(
        f"{level}: train {row['train_first']:.4f} -> {row['train_last']:.4f}; held-out {row['heldout_step0']:.4f}"
        f" -> {row['heldout_end']:.4f} (x{row['heldout_ratio']:.3f}); {row['seconds_per_step']:.2f} s/step",
        flush=True,
    )
    return row


def render_markdown(result: dict) -> str:
    """The docs/benchmarks.md section for one run."""
    rows = [
        [
            r["level"],
            r["objective"],
            f"{r['steps']} x {r['batch_size']} @ {r['lr']:g}",
            f"{r['train_first']:.4f} -> {r['train_last']:.4f} ({r['train_window']})",
            f"{r['heldout_step0']:.4f} -> {r['heldout_end']:.4f}",
            f"{r['heldout_ratio']:.3f}" + (" (met)" if r["meets_criterion"] else " (NOT met)"),
            f"{r['seconds_per_step']:.2f}",
        ]
        for r in result["levels"]
    ]
    m = result["machine"]
    table = md_table(
        [
            "level",
            "objective",
            "steps x batch @ lr",
            "train loss (mean of first n -> last n steps, n)",
            "held-out loss (step 0 -> end)",
            f"end / step 0 (<= {CRITERION})",
            "s / step",
        ],
        rows,
    )
    return "\n".join(
        [
            f"### Preset `{result['preset']}` ({result['image_size']} px), "
            f"{result['train_slices']} training slices, {result['heldout_slices']} held-out slices",
            "",
            f"Measured {result['date']} on {m['cpu']} ({m['cpu_cores_usable']} usable cores, shared; "
            f"{result['threads']} torch thread(s), {result.get('precision', 'fp32')} training), GPU: {m['gpu']}; "
            f"torch {m['torch']}, MONAI {m['monai']}.",
            "",
            f"Command: `{result['command']}`",
            "",
            table,
            "",
        ]
    )


def build_caches(args: argparse.Namespace, size: int, work: Path) -> tuple[Any, Any]:
    train_paths = [p for folder in TRAIN_FOLDERS for p in discover_studies(args.data / folder)]
    train = SliceCache.build(train_paths, work / "train_cache", size, progress=False)
    held = SliceCache.build(discover_studies(args.data / HELDOUT_FOLDER), work / "heldout_cache", size, progress=False)
    return SliceSubset(train, args.train_slices), held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny (random, 128 px) or litemedsam (bundled, 256 px)")
    parser.add_argument("--levels", nargs="+", default=list(EXPERTS), choices=EXPERTS)
    parser.add_argument("--steps", type=int, default=None, help="steps per level (default: the preset's recipe)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--train-slices", type=int, default=None, help="train on this many evenly spaced slices")
    parser.add_argument("--heldout-slices", type=int, default=None, help="evaluate on this many held-out slices")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=TRAIN_PRECISIONS, default="fp32", help="bf16: forward under autocast")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None, help="default: docs/results/ssl_heldout[_<preset>].json")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"shared data not found at {args.data}: set SAMORA_SHARED_DATA or pass --data")
    torch.set_num_threads(args.threads)
    size = IMAGE_SIZES.get(args.preset, 1024)
    suffix = "" if args.preset == "tiny" else f"_{args.preset}"
    out = args.out or ROOT / "docs" / "results" / f"ssl_heldout{suffix}.json"
    result: dict[str, Any] = {
        "date": now_utc(),
        "command": command_line(),
        "threads": args.threads,
        "precision": args.precision,
        "machine": machine_info(1, args.threads),
        "preset": args.preset,
        "image_size": size,
        "criterion": f"held-out end <= {CRITERION} x step 0",
        "levels": [],
    }
    with tempfile.TemporaryDirectory(prefix="ssl_heldout_") as tmp:
        train, held = build_caches(args, size, Path(tmp))
        result["train_slices"], result["heldout_slices"] = len(train), min(len(held), args.heldout_slices or len(held))
        model = SamoraModel(ModelConfig(preset=args.preset, image_size=size, labels={"organ": 1}))
        for level in args.levels:
            result["levels"].append(
                run_level(model=model, level=level, train=train, held=held, args=args, work=Path(tmp) / "experts")
            )
    write_json(out, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
