"""`samora pretrain`: stage-1 self-supervised training of the image, patch and pixel experts on unlabeled studies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from samora.config import CONTEXTS, EXPERTS, ModelConfig, SSLSettings, expert_levels
from samora.engine.precision import TRAIN_PRECISIONS

if TYPE_CHECKING:
    from samora.data import IntensityWindow

# Named CT windows for --window (MR always uses its percentile window).
_WINDOWS = ("auto", "abdomen", "soft-tissue", "wide")


def add_pretrain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `pretrain` subcommand on the `samora` parser's subparsers."""
    p = subparsers.add_parser(
        "pretrain",
        help="train the three LoRA experts self-supervised on unlabeled studies (resumable)",
        description="Stage 1: contrastive (image), masked image modelling (patch) and denoising (pixel) experts. "
        "Running it again with the same --out resumes: finished levels are skipped, an interrupted one continues "
        "from its last checkpoint.",
    )
    p.add_argument("--studies", required=True, type=Path, help="folder of unlabeled studies (or a slice-cache folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder (experts, logs, checkpoints, OUT/cache)")
    p.add_argument("--preset", default="tiny", help="backbone preset: tiny, vit_b, vit_l, vit_h (default: tiny)")
    p.add_argument("--image-size", type=int, default=ModelConfig.image_size, help="input size S (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="SAM checkpoint (.pth) for the vit_* presets")
    p.add_argument("--rank", type=int, default=ModelConfig.expert_rank, help="LoRA rank (default: %(default)s)")
    p.add_argument("--context", default="single", choices=CONTEXTS, help="slice context (default: single)")
    p.add_argument("--levels", default=",".join(EXPERTS), help="comma-separated subset of image,patch,pixel")
    p.add_argument("--epochs", type=int, default=None, help="epochs per level (default: 30 unless --max-steps)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per level (caps --epochs)")
    p.add_argument("--batch-size", type=int, default=SSLSettings.batch_size)
    p.add_argument("--lr", type=float, default=SSLSettings.lr)
    p.add_argument("--weight-decay", type=float, default=SSLSettings.weight_decay)
    p.add_argument(
        "--checkpoint-every", type=int, default=SSLSettings.checkpoint_every, help="steps between resumable checkpoints"
    )
    p.add_argument("--num-workers", type=int, default=SSLSettings.num_workers, help="data-loader worker processes")
    p.add_argument("--seed", type=int, default=SSLSettings.seed)
    p.add_argument(
        "--precision", default=SSLSettings.precision, choices=TRAIN_PRECISIONS, help="bf16: autocast forward passes"
    )
    p.add_argument("--window", default="auto", choices=_WINDOWS, help="CT intensity window (auto: per modality)")
    p.add_argument("--teacher", default=None, help="optional trained ResNet state dict for image-level distillation")
    p.add_argument("--teacher-arch", default="resnet50", help="torchvision architecture of --teacher")
    p.add_argument(
        "--heldout",
        type=Path,
        default=None,
        help="study folder or file held out of training: "
        "each level's loss on it at step 0 and at the end is recorded in its expert metadata",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_nproc_argument(p)
    p.set_defaults(func=run_pretrain)
    return p


def run_pretrain(args: argparse.Namespace) -> int:
    """Handler of `samora pretrain`."""
    from samora.distributed import process_group
    from samora.distributed.launch import relaunch_cli
    from samora.ssl import pretrain

    try:
        levels = expert_levels(args.levels)
    except ValueError as e:
        raise ValueError(f"--levels: {e}") from None
    if not args.studies.exists():
        raise FileNotFoundError(f"--studies: {args.studies} does not exist")
    config = model_config(args, expert_rank=args.rank)
    if args.preset != "tiny" and args.checkpoint is None:
        print(
            f"samora: warning: preset {args.preset!r} without --checkpoint trains experts on a RANDOM backbone",
            file=sys.stderr,
        )
    if relaunch_cli(args.nproc, args.device, args.argv):
        return 0
    with process_group(args.device) as ctx:
        summaries = _pretrain(pretrain, args, config, levels)
    if not ctx.is_main:
        return 0
    for level, s in summaries.items():
        loss = s.get("final_loss")
        speed = s.get("slices_per_second")
        print(
            f"{level:<6} {s['status']:<9} steps {s.get('steps')}"
            + (f"  final loss {loss:.4f}" if loss is not None else "")
            + (f"  {speed:.1f} slices/s" if speed else "")
            + _heldout_text(s.get("heldout"))
        )
    print(f"experts, loss logs and loss_curves.png in {args.out}")
    return 0 if all(s["status"] in ("finished", "skipped") for s in summaries.values()) else 1


def _pretrain(pretrain, args: argparse.Namespace, config: ModelConfig, levels: tuple[str, ...]) -> dict:
    from samora.ssl import RunHooks

    settings = SSLSettings(
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        checkpoint_every=args.checkpoint_every,
        num_workers=args.num_workers,
        seed=args.seed,
        precision=args.precision,
    )
    return pretrain(
        args.studies,
        args.out,
        config,
        settings,
        levels=levels,
        epochs=args.epochs,
        max_steps=args.max_steps,
        window=_window(args.window),
        teacher=args.teacher,
        teacher_arch=args.teacher_arch,
        device=args.device,
        hooks=RunHooks(progress=not args.no_progress),
        heldout=args.heldout,
    )


def model_config(args: argparse.Namespace, **extra) -> ModelConfig:
    """The ModelConfig of the backbone options shared by `pretrain` and `finetune`."""
    return ModelConfig(
        preset=args.preset, image_size=args.image_size, checkpoint=args.checkpoint, context=args.context, **extra
    )


def add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    """`--nproc N`: train in N torchrun processes on this node (one per GPU, or gloo CPU processes)."""
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this node: one per GPU with --device cuda, else gloo CPU processes (default: 1). "
        "For several nodes run this command under torchrun with rendezvous arguments instead",
    )


def _heldout_text(record: dict | None) -> str:
    """'  held-out 0.91 -> 0.80 (x0.88)' when the level was evaluated on held-out studies."""
    if not record or record.get("step0_loss") is None:
        return ""
    return f"  held-out {record['step0_loss']:.4f} -> {record['end_loss']:.4f} (x{record['end_over_step0']:.3f})"


def _window(name: str) -> IntensityWindow | None:
    """The IntensityWindow for --window (None: per-modality default)."""
    from samora.data import IntensityWindow

    return {
        "auto": None,
        "abdomen": IntensityWindow.ct_abdomen(),
        "soft-tissue": IntensityWindow.ct_soft_tissue(),
        "wide": IntensityWindow.ct_wide(),
    }[name]
