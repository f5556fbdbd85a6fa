"""How far can the patch-level (masked image modelling) loss fall on real slices in a few hundred steps?

Stage 1's test asks the MIM loss to fall below 0.8x its start within a few hundred steps. This script measures,
on the SAME task (75% random masks on the 16 px token grid, per-patch normalised pixel targets, loss on masked
patches only), relative to predicting 0 everywhere (a zero-initialised decoder's step-0 loss):
- our patch objective (frozen random `tiny` encoder + patch expert + light decoder) in its default configuration
  and with a deeper decoder and/or without rot90/flip augmentation;
- a fully trainable MONAI UNet that sees the visible PIXELS (not tokens) plus the mask: a reference for what a
  strong inpainting network extracts from the visible quarter in the same number of steps;
both on the stage-1 test's slices (training-loss criterion) and on a study held out from training (does the fall
transfer, or is it memorised slices?).

    python bench/mim_reference.py [--steps 400] [--reference-steps 400] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet
from paths import DATA, ROOT
from records import command_line, machine_info, now_utc, write_json
from report import md_table

from samora.config import ModelConfig
from samora.data import SliceCache, discover_studies
from samora.model import SamoraModel
from samora.ssl import build_objective, train_expert
from samora.ssl.objectives import MaskedImageObjective, normalise_patches, patchify, random_token_mask
from samora.ssl.trainer import RunHooks, SSLSettings, checkpoint_path, log_path, warmup_poly

SIZE = 128
PATCH = 16
# Two settings: the stage-1 test's slices (its training-loss criterion), and a split by study to see whether a
# falling training loss is structure that transfers or memorised slices.
SETTINGS = {
    "test_slices": {"train": ("aorta_crop", "pulmonary_crop", "image"), "held_out": ()},
    "held_out_study": {"train": ("aorta_crop", "image"), "held_out": ("pulmonary_crop",)},
}
FOLDERS = ("ct_chest_totalseg", "ct_abdomen_totalseg")
# The stage-1 test's patch recipe (tests/test_ssl.py RECIPES["patch"]): steps, batch, lr.
SAMORA_RECIPE = (400, 16, 3e-3)
CONFIGS = {
    "default": {},
    "deeper decoder": {"decoder_depth": 2},
    "no augmentation": {"augment": False},
    "no augmentation, deeper decoder": {"augment": False, "decoder_depth": 2},
}
UNET_LR = 2e-3
EVAL_SEED = 123
TASK_NOTE = (
    "Task of every row: 128 px CT slices (abdomen window), 75% of the 8 x 8 token grid masked at random, targets = "
    "each masked 16 x 16 patch's pixels normalised to zero mean and unit variance, squared error averaged over "
    "masked patches. 'zero prediction' is the loss of predicting 0 everywhere (a zero-initialised decoder's step-0 "
    "loss); train and held-out losses are measured after training, un-augmented, with the same fixed masks for "
    "every model. test_slices = the stage-1 test's slices (both chest crops + the abdomen CT); held_out_study "
    "trains on aorta_crop + the abdomen CT and scores the unseen pulmonary_crop. SAMora rows: frozen random `tiny` "
    "ViT + the patch expert + the light decoder. The UNet sees the visible pixels themselves and is fully "
    "trainable: a reference for the same task, not a stage-1 candidate (no ViT, no expert). Its output layer is not "
    "zero-initialised, so it starts above the zero-prediction loss and its last/first ratio flatters it: compare "
    "the '/ zero prediction' columns."
)


def window_means(losses: list[float], n: int = 10) -> tuple[float, float]:
    """Mean of the first and of the last `n` step losses (the issue's criterion compares them)."""
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


def zero_prediction_loss(cache: SliceCache, eps: float) -> float:
    """Expected loss of predicting 0: the mean squared normalised pixel over all patches (masks are uniform)."""
    total, count = 0.0, 0
    for i in range(len(cache)):
        image = torch.as_tensor(cache[i])[None]
        per_patch = normalise_patches(patchify(image, PATCH), eps).pow(2).mean(-1)
        total += float(per_patch.sum())
        count += per_patch.numel()
    return total / count


def train_samora(cache: SliceCache, work: Path, steps: int, options: dict) -> tuple[list[float], Callable]:
    """Train the patch expert (test recipe, objective `options`); per-step losses and a held-out loss function."""
    _, batch, lr = SAMORA_RECIPE
    model = SamoraModel(ModelConfig(preset="tiny", image_size=SIZE, labels={"organ": 1}))
    settings = SSLSettings(batch_size=batch, lr=lr)
    train_expert(
        model=model,
        level="patch",
        cache=cache,
        out_dir=work,
        total_steps=steps,
        settings=settings,
        hooks=RunHooks(progress=False),
        objective_options=options,
    )
    objective = build_objective("patch", model, **options)
    objective.load_state_dict(torch.load(checkpoint_path(work, "patch"), weights_only=True)["head"])
    model.set_stage("ssl-patch")
    model.eval()
    objective.eval()
    losses = [json.loads(line)["loss"] for line in log_path(work, "patch").read_text().splitlines()]
    return losses, lambda images, generator: objective(model, (images,), generator)["loss"]


def reference_unet() -> torch.nn.Module:
    """A 4-level MONAI UNet: input (masked grey slice, mask), output the slice's grey values."""
    return UNet(spatial_dims=2, in_channels=2, out_channels=1, channels=(32, 64, 128, 256), strides=(2, 2, 2))


def unet_loss(
    net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, objective: MaskedImageObjective
) -> torch.Tensor:
    """The objective's task for the UNet: same mask grid and ratio, same normalised targets, masked patches only."""
    grey = images[:, :1]
    grid = SIZE // PATCH
    mask = random_token_mask(
        batch=len(images), height=grid, width=grid, ratio=objective.mask_ratio, generator=generator
    )
    pixel_mask = mask.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[:, None].float()
    prediction = net(torch.cat([grey * (1 - pixel_mask), pixel_mask], dim=1))
    target = normalise_patches(patchify(grey, PATCH), objective.norm_eps)
    return (patchify(prediction, PATCH) - target).pow(2).mean(-1)[mask].mean()


def train_unet(cache: SliceCache, steps: int, seed: int = 0) -> tuple[list[float], Callable]:
    """Train the pixel-level reference with the default objective's augmentation, schedule shape and batch size."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    objective = MaskedImageObjective(1)
    net = reference_unet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=UNET_LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(steps, max(1, steps // 20)))
    _, batch, _ = SAMORA_RECIPE
    losses = []
    for _ in range(steps):
        picks = torch.randint(0, len(cache), (batch,), generator=generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (batch,), generator=generator).tolist()
        images = torch.stack(
            [objective.preparer(torch.as_tensor(cache[i]), s)[0] for i, s in zip(picks, seeds, strict=True)]
        )
        loss = unet_loss(net, images, generator, objective)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    net.eval()
    return losses, lambda images, generator: unet_loss(net, images, generator, objective)


@torch.no_grad()
def mean_loss(loss_fn: Callable, cache: SliceCache, batch: int = 16) -> float:
    """Loss over every slice of `cache`, un-augmented, with masks from a fixed seed (same for every model)."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    total = 0.0
    for start in range(0, len(cache), batch):
        images = torch.stack([torch.as_tensor(cache[i]) for i in range(start, min(start + batch, len(cache)))])
        total += float(loss_fn(images, generator)) * len(images)
    return total / len(cache)


def studies_named(data: Path, stems: tuple[str, ...]) -> list[Path]:
    """The studies of FOLDERS whose file name starts with one of `stems`."""
    found = [p for folder in FOLDERS for p in discover_studies(data / folder)]
    return [p for p in found if p.name.split(".")[0] in stems]


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    setting = SETTINGS[name]
    train = SliceCache.build(studies_named(args.data, setting["train"]), work / "train", SIZE, progress=False)
    held = None
    if setting["held_out"]:
        held = SliceCache.build(studies_named(args.data, setting["held_out"]), work / "held", SIZE, progress=False)
    eps = MaskedImageObjective(1).norm_eps
    record = {"setting": name, "train_slices": len(train), "train_zero_loss": zero_prediction_loss(train, eps)}
    if held is not None:
        record.update(held_out_slices=len(held), held_out_zero_loss=zero_prediction_loss(held, eps))
    runs = {f"samora: {label}": (args.steps, options) for label, options in CONFIGS.items()}
    if held is not None:
        runs.update({f"unet: {steps} steps": (steps, None) for steps in args.reference_steps})
    record["runs"] = {}
    for key, (steps, options) in runs.items():
        start = time.perf_counter()
        if options is None:
            losses, loss_fn = train_unet(train, steps)
        else:
            losses, loss_fn = train_samora(train, work / key.replace(" ", "_").replace(",", ""), steps, options)
        first, last = window_means(losses)
        run = {"steps": steps, "options": options, "first10": first, "last10": last, "last_over_first": last / first}
        run["train_over_zero"] = mean_loss(loss_fn, train) / record["train_zero_loss"]
        if held is not None:
            run["held_out_over_zero"] = mean_loss(loss_fn, held) / record["held_out_zero_loss"]
        run["seconds"] = time.perf_counter() - start
        record["runs"][key] = run
        held_text = f", held-out x{run['held_out_over_zero']:.3f} of zero" if held is not None else ""
        print(
            f"  {name} | {key}: last/first 10 x{run['last_over_first']:.3f}, train x{run['train_over_zero']:.3f} "
            f"of zero{held_text} ({run['seconds']:.0f} s)",
            flush=True,
        )
    return record


def _reading(result: dict) -> list[str]:
    """What the table says, computed from it: which configuration falls furthest in training vs on a held-out study."""
    lines = []
    for r in result["settings"]:
        runs = r["runs"]
        best_train = min(runs, key=lambda k: runs[k]["train_over_zero"])
        lines.append(
            f"- {r['setting']}: lowest training loss {runs[best_train]['train_over_zero']:.3f} x zero prediction "
            f"({best_train}); last 10 / first 10 steps of the default configuration: "
            f"{runs['samora: default']['last_over_first']:.3f} (criterion < 0.8)."
        )
        held = {k: v["held_out_over_zero"] for k, v in runs.items() if "held_out_over_zero" in v}
        if held:
            best = min(held, key=held.get)
            order = ", ".join(f"{k} {v:.3f}" for k, v in sorted(held.items(), key=lambda kv: kv[1]))
            lines.append(f"- {r['setting']}: on the unseen study, best is {best}; all: {order}.")
    return [*lines, ""]


def render_markdown(result: dict) -> str:
    """Section 6 of docs/benchmarks.md (bench/run_all.py includes it when the JSON exists)."""
    rows = []
    for r in result["settings"]:
        data = f"{r['setting']} (train {r['train_slices']}" + (
            f", held out {r['held_out_slices']})" if "held_out_slices" in r else ")"
        )
        for key, run in r["runs"].items():
            held = f"{run['held_out_over_zero']:.3f}" if "held_out_over_zero" in run else "-"
            rows.append(
                [data, key, run["steps"], f"{run['last_over_first']:.3f}", f"{run['train_over_zero']:.3f}", held]
            )
    table = md_table(
        [
            "slices",
            "model",
            "steps",
            "last 10 / first 10 steps",
            "train loss / zero prediction",
            "held-out loss / zero prediction",
        ],
        rows,
    )
    m = result["machine"]
    return "\n".join(
        [
            "## 6. Stage 1, patch level: how far the masked-image-modelling loss can fall",
            "",
            *_reading(result),
            f"Measured {result['date']} on {m['cpu']} ({m['cpu_cores_usable']} usable cores, {result['threads']} torch "
            f"threads), GPU: {m['gpu']}; torch {m['torch']}, MONAI {m['monai']}. One seed per row.",
            "",
            f"Command: `{result['command']}`",
            "",
            TASK_NOTE + f" SAMora rows use the test's recipe (steps, batch, lr) = {SAMORA_RECIPE}.",
            "",
            table,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=SAMORA_RECIPE[0], help="patch-expert steps (test recipe: 400)")
    parser.add_argument("--reference-steps", type=int, nargs="+", default=[SAMORA_RECIPE[0]], help="UNet run lengths")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="subset of the settings")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mim_reference.json")
    parser.add_argument("--report", type=Path, default=None, help="also write the markdown section here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"shared data not found at {args.data}: set SAMORA_SHARED_DATA or pass --data")
    torch.set_num_threads(args.threads)
    result = {
        "date": now_utc(),
        "command": command_line(),
        "threads": args.threads,
        "machine": machine_info(1, args.threads),
        "settings": [],
    }
    with tempfile.TemporaryDirectory(prefix="mim_reference_") as tmp:
        for name in SETTINGS:
            if not args.only or name in args.only:
                result["settings"].append(measure(name, args, Path(tmp) / name))
    write_json(args.out, result)
    report = render_markdown(result)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
