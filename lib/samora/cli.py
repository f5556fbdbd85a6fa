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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `samora` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"samora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
