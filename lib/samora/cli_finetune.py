"""`samora finetune`: stage 2 on labelled studies, published as the next version of a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from samora.cli_pretrain import add_nproc_argument, model_config
from samora.config import CONTEXTS, ModelConfig
from samora.engine.precision import TRAIN_PRECISIONS
from samora.engine.train import TRAIN_MODES


def add_finetune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `finetune` subcommand on the `samora` parser's subparsers."""
    p = subparsers.add_parser(
        "finetune",
        help="stage 2: train the prompt-free head (and HL-Attn in full mode) on labelled studies; publishes a version",
        description="Pairs each study with the label file of the same name, trains from the folder's current version "
        "(or a fresh model when there is none or its configuration differs) and publishes the next version.",
    )
    p.add_argument("--studies", required=True, type=Path, help="folder of images")
    p.add_argument("--label-dir", type=Path, default=None, help="label files (default: STUDIES/labels/final)")
    p.add_argument("--out", required=True, type=Path, help="model folder (versions/, current.json, embeddings/)")
    p.add_argument("--labels", default=None, help="label map as JSON, e.g. '{\"liver\": 1}' (default: 8 BTCV organs)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=ModelConfig.image_size)
    p.add_argument("--checkpoint", default=None, help="SAM checkpoint (.pth) for the vit_* presets")
    p.add_argument("--context", default="single", choices=CONTEXTS)
    p.add_argument("--mode", default="cached", choices=TRAIN_MODES, help="cached: heads on stored embeddings")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=TRAIN_PRECISIONS, help="bf16: autocast forward passes")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    add_nproc_argument(p)
    p.set_defaults(func=run_finetune)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    """Handler of `samora finetune`: runs in every rank when started under torchrun."""
    from samora.distributed import main_first, process_group, rank_device
    from samora.distributed.launch import relaunch_cli
    from samora.engine.train import FinetuneConfig, LabeledSlices, finetune, load_labeled_cases

    cases = labelled_cases(args.studies, args.label_dir or args.studies / "labels" / "final")
    config = _model_config(args)
    if relaunch_cli(args.nproc, args.device, args.argv):
        return 0
    with process_group(args.device) as ctx:
        slices_dir = args.out / "finetune_slices"
        with main_first(ctx):  # rank 0 reads the studies once; every rank memory-maps the result
            if ctx.is_main:
                load_labeled_cases(cases, config.image_size, config.context, seed=args.seed).save(slices_dir)
        model, base = _starting_model(args.out, config)
        settings = FinetuneConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            mode=args.mode,
            device=rank_device(args.device),
            embedding_dir=str(args.out / "embeddings"),
            precision=args.precision,
        )
        result = finetune(model, LabeledSlices.open(slices_dir), settings)
        if ctx.is_main:
            from samora.engine.store import ModelStore

            meta = {"trained_on": [c for c, _, _ in cases], "base_version": base, "train_mode": result["mode"]}
            meta.update(history=result["history"], best_metric=result["best_metric"], processes=ctx.world_size)
            version = ModelStore(args.out).publish(model.cpu(), metadata=meta)
            print(f"published version {version} in {args.out} (best dice {result['best_metric']:.4f})")
    return 0


def labelled_cases(studies: Path, label_dir: Path) -> list[tuple[str, str, str]]:
    """(case id, image, label) for every study with a label file of the same name."""
    from samora.data import discover_studies

    cases = [(p.name.split(".")[0], str(p), str(label_dir / p.name)) for p in discover_studies(studies)]
    cases = [c for c in cases if Path(c[2]).is_file()]
    if not cases:
        raise FileNotFoundError(f"no study in {studies} has a label file of the same name in {label_dir}")
    return cases


def _model_config(args: argparse.Namespace) -> ModelConfig:
    from samora.serving.settings import parse_labels

    return model_config(args, **({"labels": parse_labels(args.labels)} if args.labels else {}))


def _starting_model(out: Path, config: ModelConfig):
    """(model, version it starts from): the folder's current version when it has this configuration."""
    from samora.engine.store import ModelStore
    from samora.model import SamoraModel

    current = ModelStore(out).load_current(checkpoint=config.checkpoint)
    if current is not None and current[1].config.to_dict() == config.to_dict():
        return current[1], current[0]
    return SamoraModel(config), None
