"""The compared configurations (SAMora variants, MONAI baselines, zero-shot reference) and how each is built and
fine-tuned."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from baselines import UNetModel


@dataclass(frozen=True)
class Method:
    """A compared configuration: a SAMora model variant or the UNet baseline."""

    key: str
    title: str
    kind: str = "sam"  # "sam", "unet", "segresnet" (baselines from scratch) or "zeroshot" (box prompts, no training)
    decoder: str = "samed"
    fusion: str = "reduced"
    finetune_experts: bool = False
    ssl: bool = False
    train_mode: str = "full"  # samora.engine.train.TRAIN_MODES: "cached" trains heads on frozen-encoder embeddings
    precision: str = "fp32"  # of its training, SSL included (samora.engine.precision.TRAIN_PRECISIONS)


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("samed", "(a) SAMed-style LoRA, no SSL", fusion="image", finetune_experts=True),
        Method("samora", "(b) SAMora: SSL experts + HL-Attn (reduced)", fusion="reduced", ssl=True),
        Method(
            "samora_ft",
            "(b') SAMora, experts also fine-tuned (app default on a random backbone)",
            fusion="reduced",
            finetune_experts=True,
            ssl=True,
        ),
        Method("samora_sum", "(c) SAMora, sum fusion", fusion="sum", ssl=True),
        Method("expert_image", "(d) image expert alone (SSL)", fusion="image", ssl=True),
        Method("expert_patch", "(d) patch expert alone (SSL)", fusion="patch", ssl=True),
        Method("expert_pixel", "(d) pixel expert alone (SSL)", fusion="pixel", ssl=True),
        Method(
            "hsam",
            "(e) H-SAM decoder, no SSL (SAMed-style LoRA)",
            decoder="hsam",
            fusion="image",
            finetune_experts=True,
        ),
        Method("hsam_ssl", "(e) H-SAM decoder + SSL experts + HL-Attn", decoder="hsam", fusion="reduced", ssl=True),
        # the full-stage rows again with bf16 autocast training: about 3x faster on a CPU with avx512_bf16, which
        # makes them fit a working day there; the SAMed-style row in both precisions shows what bf16 changes
        Method(
            "samed_bf16",
            "(a) SAMed-style LoRA, no SSL; bf16 training",
            fusion="image",
            finetune_experts=True,
            precision="bf16",
        ),
        Method(
            "samora_bf16",
            "(b) SAMora: SSL experts + HL-Attn (reduced); bf16 training, SSL included",
            fusion="reduced",
            ssl=True,
            precision="bf16",
        ),
        Method(
            "hsam_ssl_bf16",
            "(e) H-SAM decoder + SSL experts + HL-Attn; bf16 training, SSL included",
            decoder="hsam",
            fusion="reduced",
            ssl=True,
            precision="bf16",
        ),
        Method("unet", "(f) MONAI 2D UNet from scratch", kind="unet"),
        Method("segresnet", "(f) MONAI 2D SegResNet from scratch", kind="segresnet"),
        Method(
            "heads",
            "(g) prompt-free heads on the frozen encoder, no experts (cached)",
            fusion="image",
            train_mode="cached",
        ),
        # HL-Attn starts as an exact no-op and the cached mode never trains it, so the cheap mode's experts can
        # only act through the plain sum of their residuals
        Method(
            "samora_cached",
            "(h) SAMora cheap mode: frozen SSL experts (sum), heads on cached embeddings",
            fusion="sum",
            ssl=True,
            train_mode="cached",
        ),
        Method(
            "zeroshot",
            "(r) zero-shot box prompt from each test slice's truth (reference, not prompt-free)",
            kind="zeroshot",
        ),
        # what the app's cached mode serves prompts with once its bootstrap has run: the same encoder as samora_cached
        Method(
            "zeroshot_sum",
            "(r') the same zero-shot box prompt through the encoder with the seed's frozen SSL experts (sum)",
            kind="zeroshot",
            fusion="sum",
            ssl=True,
        ),
    )
}


def build_model(
    method: Method,
    labels: dict[str, int],
    image_size: int,
    seed: int,
    preset: str = "tiny",
    checkpoint: str | None = None,
    experts_dir: str | Path | None = None,
) -> torch.nn.Module:
    """A fresh model for `method` (backbone and new heads seeded by `seed`), SSL experts loaded where it uses them."""
    if method.kind in ("unet", "segresnet"):
        return UNetModel(labels, image_size, seed, arch=method.kind)
    from samora.config import ModelConfig
    from samora.model import SamoraModel
    from samora.ssl.experts_io import load_experts

    config = ModelConfig(
        preset=preset,
        image_size=image_size,
        checkpoint=checkpoint,
        labels=dict(labels),
        decoder=method.decoder,
        fusion=method.fusion,
        finetune_experts=method.finetune_experts,
        prompt_head=False,
        init_seed=seed,
    )
    model = SamoraModel(config)
    if method.ssl:
        if experts_dir is None:
            raise ValueError(f"method {method.key} needs SSL experts")
        load_experts(model, experts_dir)
    return model


def trainable_count(model: torch.nn.Module, train_mode: str = "full") -> int:
    """Number of parameters stage 2 trains for this model in `train_mode`."""
    model.set_stage("finetune-heads" if train_mode == "cached" else "finetune")
    count = sum(p.numel() for p in model.trainable_parameters())
    model.set_stage("inference")
    return int(count)


def finetune_config(
    steps: int,
    n_slices: int,
    batch_size: int,
    lr: float,
    seed: int,
    mode: str = "full",
    embedding_dir: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
):
    """Stage-2 settings with a fixed optimiser-step budget (independent of how many slices are labelled).

    No augmentation and no prompt-path training: identical for every method, and MONAI's per-sample affine
    augmentation would cost more CPU time than the tiny model's training step.
    """
    from samora.engine.train import FinetuneConfig

    per_epoch = max(1, math.ceil(n_slices / batch_size))
    return FinetuneConfig(
        epochs=math.ceil(steps / per_epoch),
        batch_size=batch_size,
        lr=lr,
        max_steps=steps,
        augment=False,
        prompt_training=False,
        seed=seed,
        mode=mode,
        embedding_dir=embedding_dir,
        device=device,
        precision=precision,
    )
