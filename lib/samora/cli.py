"""The `samora` command line."""

from __future__ import annotations

import argparse
import json
import sys

from samora.config import DECODERS, FUSION_MODES, ConfigError, ModelConfig


def _model_info(args: argparse.Namespace) -> int:
    import torch

    from samora.model import SamoraModel

    torch.set_num_threads(max(1, torch.get_num_threads()))
    labels = {f"class_{i}": i for i in range(1, args.num_classes)} if args.num_classes else None
    config = ModelConfig(
        preset=args.preset,
        image_size=args.image_size,
        decoder=args.decoder,
        fusion=args.fusion,
        **({"labels": labels} if labels else {}),
    )
    # Parameter counts do not depend on weights: a seeded random backbone is built, nothing is loaded.
    report = SamoraModel(config).parameter_report()
    report["config"] = {k: getattr(config, k) for k in ("preset", "image_size", "decoder", "fusion")}
    report["config"]["num_classes"] = config.num_classes
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"preset {config.preset}, image size {config.image_size}, decoder {config.decoder}, fusion {config.fusion}")
    print(f"total parameters: {report['total']:,}")
    for name, n in report["components"].items():
        print(f"  {name:<16} {n:>14,}")
    for stage, counts in report["stages"].items():
        print(f"  stage {stage:<10} trainable {counts['trainable']:>12,}  frozen {counts['frozen']:>14,}")
    return 0


def _make_sample_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from samora.data import write_phantom_studies

    out = Path(args.out)
    truth = Path(args.truth) if args.truth else out.parent / f"{out.name}_truth"
    info = write_phantom_studies(
        out, n_labeled=args.labeled, n_unlabeled=args.unlabeled, seed=args.seed, truth_dir=truth
    )
    print(
        f"sample datastore in {out}: {len(info['labeled'])} labeled, {len(info['unlabeled'])} unlabeled synthetic "
        f"abdominal CT phantoms (labels {info['labels']}); ground truth of the unlabeled ones in {truth}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    parser = argparse.ArgumentParser(prog="samora", description="SAMora: SAM with self-supervised LoRA experts")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("model-info", help="parameter counts per stage and component")
    info.add_argument("--preset", default="tiny")
    info.add_argument("--image-size", type=int, default=256)
    info.add_argument("--fusion", default="reduced", choices=FUSION_MODES)
    info.add_argument("--decoder", default="samed", choices=DECODERS)
    info.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default: 9)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_model_info)
    sample = sub.add_parser("make-sample-data", help="write the demo datastore of synthetic CT phantoms")
    sample.add_argument("--out", required=True)
    sample.add_argument("--truth", default=None, help="folder for the unlabeled studies' ground truth")
    sample.add_argument("--labeled", type=int, default=3)
    sample.add_argument("--unlabeled", type=int, default=3)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_make_sample_data)
    __import__("samora.cli_pretrain", fromlist=["add_pretrain_parser"]).add_pretrain_parser(sub)
    __import__("samora.cli_finetune", fromlist=["add_finetune_parser"]).add_finetune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `samora` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for a relaunch under torchrun (--nproc)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"samora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
