"""Stage 2: fine-tune HL-Attn + decoders (and the prompt path) on labelled slices."""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandScaleIntensityd

from samora.distributed.context import (
    DistContext,
    any_rank,
    context,
    gather_rows,
    mean_over_ranks,
    shard_rows,
    wrap_ddp,
)
from samora.engine.labeled import (
    LabeledSlices,
    concat_slices,
    hold_out_last_study,
    load_labeled_cases,
    slices_from_arrays,
)
from samora.engine.losses import PromptLoss, SegmentationLoss
from samora.engine.precision import check_precision, training_autocast
from samora.engine.prompts import simulate_prompt
from samora.engine.segmenter import Segmenter
from samora.model import SamoraModel
from samora.schedule import warmup_poly, warmup_steps

log = logging.getLogger(__name__)

__all__ = [
    "TRAIN_MODES",
    "FinetuneConfig",
    "LabeledSlices",
    "concat_slices",
    "evaluate_slices",
    "finetune",
    "hold_out_last_study",
    "load_labeled_cases",
    "slices_from_arrays",
]


TRAIN_MODES = ("full", "cached")


@dataclass
class FinetuneConfig:
    """Stage-2 optimisation settings (SAMora fine-tunes for few epochs: 20-30 in the paper)."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    ce_weight: float = 0.2
    prompt_training: bool = True
    augment: bool = True
    empty_slice_fraction: float = 0.1  # share of label-free body slices kept, so the model learns "nothing here"
    max_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    # "full": HL-Attn + heads + prompt path, back-propagating through the encoder (a GPU-sized job);
    # "cached": heads + prompt path on embeddings of the frozen encoder, each computed once (see EmbeddingStore)
    mode: str = "full"
    embedding_dir: str | None = None  # where "cached" keeps embeddings; None: a temporary folder for this run
    # learning rate of a PRETRAINED prompt path relative to `lr`: it already answers boxes well, and the new heads'
    # rate would overwrite that on a few labels (LiteMedSAM's own fine-tuning uses 1e-5)
    prompt_lr_scale: float = 0.01
    # torch threads for a cached-mode training (None: unchanged): the one-off encoding dominates a first training on
    # a CPU, and nothing else heavy runs then, so the app gives it every core
    threads: int | None = None
    # the best epoch is chosen on at most this many training slices when there is no validation set (evaluating
    # every slice each epoch cost as much as training in the cached mode)
    max_check_slices: int = 32
    # slices per step the prompt path trains on (None: the whole batch); a pretrained prompt path needs little
    # adaptation, and each prompt decode costs as much as the head's on a CPU
    prompt_slices: int | None = None
    # "bf16": forward passes (steps and the best-epoch check) under bf16 autocast; see samora.engine.precision
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"invalid fine-tuning config: {asdict(self)}")
        check_precision(self.precision)
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"fine-tuning mode {self.mode!r} is not one of {TRAIN_MODES}")


def _augmenter(seed: int) -> Compose:
    # Small geometric/intensity changes only: flips would swap left/right organs.
    transform = Compose(
        [
            RandAffined(
                keys=("image", "label"),
                prob=0.5,
                rotate_range=0.15,
                scale_range=0.1,
                translate_range=8,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


@torch.no_grad()
def evaluate_slices(
    model: Segmenter,
    data: LabeledSlices,
    batch_size: int = 8,
    device: str = "cpu",
    embeddings: np.ndarray | None = None,
) -> float:
    """Mean foreground Dice over classes present in `data` (computed on the whole set, per class).

    With `embeddings` (the data's cached image embeddings) the encoder is not run."""
    model.eval()
    k = model.config.num_classes
    inter = np.zeros(k)
    total = np.zeros(k)
    for start in range(0, len(data), batch_size):
        window = slice(start, start + batch_size)
        if embeddings is not None:
            out = model.decode(torch.as_tensor(embeddings[window], dtype=torch.float32, device=device))
        else:
            out = model(torch.as_tensor(data.images[window], dtype=torch.float32, device=device))
        pred = model.probabilities(out).argmax(1).cpu()
        y = torch.as_tensor(data.labels[window].astype(np.int64))
        for c in range(1, k):
            p, t = pred == c, y == c
            inter[c] += float((p & t).sum())
            total[c] += float(p.sum() + t.sum())
    present = [c for c in range(1, k) if (data.labels == c).any()]
    if not present:
        return math.nan
    return float(np.mean([2 * inter[c] / total[c] for c in present]))


def _prompt_loss(model, emb, labels, rng, loss_fn, max_slices: int | None = None) -> torch.Tensor | None:
    """Simulate one prompt per slice (on at most `max_slices` random slices of the batch); boxes and point sets
    decode as two groups (uniform prompt tensors)."""
    if max_slices is not None and len(labels) > max_slices:
        keep = np.sort(rng.choice(len(labels), max_slices, replace=False))
        emb, labels = emb[torch.as_tensor(keep)], labels[torch.as_tensor(keep)]
    prompts = [simulate_prompt(labels[i], rng) for i in range(len(labels))]
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, p in enumerate(prompts):
        if p is not None:
            groups[p.box is not None].append(i)
    losses = []
    for is_box, idx in groups.items():
        if not idx:
            continue
        chosen = [prompts[i] for i in idx]
        sub = emb[idx]
        if is_box:
            out = model.prompt(sub, boxes=torch.stack([p.box for p in chosen]).to(emb.device))
        else:
            coords = torch.stack([p.coords for p in chosen]).to(emb.device)
            point_labels = torch.stack([p.point_labels for p in chosen]).to(emb.device)
            out = model.prompt(sub, points=(coords, point_labels))
        logits = model.prompt_head.best_mask(out)
        target = torch.stack([p.target for p in chosen])[:, None].to(emb.device)
        losses.append(loss_fn(logits, target) * len(idx))
    return sum(losses) / len(prompts) if losses else None


def _optimizer(model: Segmenter, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the stage's trainables; a pretrained prompt path learns at `prompt_lr_scale` x the rate."""
    trainable = {id(p) for p in model.trainable_parameters()}
    prompt_scale = config.prompt_lr_scale if model.backbone.pretrained else 1.0
    prompt = [p for p in model.prompt_path_parameters() if id(p) in trainable]
    prompt_ids = {id(p) for p in prompt}
    rest = [p for p in model.trainable_parameters() if id(p) not in prompt_ids]
    groups = [{"params": rest, "lr": config.lr}, {"params": prompt, "lr": config.lr * prompt_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def frozen_encoder_store(root: str, model: SamoraModel, device: str | torch.device):
    """The embedding store of a frozen encoder outside the server (training, benchmarks): an exported graph in
    OpenVINO or ONNX Runtime for a pretrained encoder on a CPU, the eager encoder otherwise (see TrainingEncoder)."""
    from samora.engine.embeddings import EmbeddingStore
    from samora.engine.encoder_path import TrainingEncoder

    if TrainingEncoder.suits(model, device):
        encoder = TrainingEncoder(model)
        return EmbeddingStore(root, model, encoder=encoder, path_name=encoder.path_name)
    return EmbeddingStore(root, model)


def _embed_for_training(
    model: SamoraModel, data: LabeledSlices | None, config: FinetuneConfig, root: str, ctx: DistContext, on_progress
):
    """Cached-mode embeddings of `data`, read from disk per batch (None when there is no such set). Each rank
    encodes its share of the missing slices into the shared folder; all then read every slice from it."""
    if data is None or not len(data):
        return None
    store = frozen_encoder_store(root, model, config.device)
    keys, _ = store.encode_missing(
        model, data.images, device=config.device, on_progress=on_progress, rank=ctx.rank, world_size=ctx.world_size
    )
    if ctx.enabled:
        torch.distributed.barrier()  # every rank's share is on disk
    return store.stored(model, data.images, keys, config.device)


def _sample_seed(seed: int, step: int, position: int) -> int:
    """Augmentation seed of one sample: its global batch position, not its rank, so any process count agrees."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])


class _Batches:
    """Training inputs: images (augmented, "full") for the encoder, or cached embeddings ("cached")."""

    def __init__(self, train: LabeledSlices, config: FinetuneConfig, embeddings) -> None:
        self.train, self.config, self.embeddings = train, config, embeddings
        self.augment = _augmenter(config.seed) if config.augment and embeddings is None else None
        self.device = torch.device(config.device)

    def __call__(self, idx: np.ndarray, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder input or embedding, labels) of one batch."""
        y = torch.as_tensor(self.train.labels[idx].astype(np.int64))
        if self.embeddings is not None:
            return torch.as_tensor(self.embeddings[idx], dtype=torch.float32, device=self.device), y.to(self.device)
        x = torch.as_tensor(self.train.images[idx], dtype=torch.float32)
        if self.augment is not None:
            pairs = []
            for i, seed in enumerate(seeds):
                self.augment.set_random_state(seed=seed)
                pairs.append(self.augment({"image": x[i], "label": y[i][None].float()}))
            x = torch.stack([torch.as_tensor(p["image"]) for p in pairs]).clamp(0, 1)
            y = torch.stack([torch.as_tensor(p["label"])[0] for p in pairs]).round().long()
        return x.to(self.device), y.to(self.device)


class _StepModule(torch.nn.Module):
    """One step's forward as a module for DistributedDataParallel: encoder ("full") and head, plus the prompt
    path's loss on this rank's real rows, so that every trained parameter is used inside forward."""

    def __init__(self, model: Segmenter, encode: bool, prompt_loss: PromptLoss | None, prompt_slices) -> None:
        super().__init__()
        self.model, self.encode, self.prompt_loss, self.prompt_slices = model, encode, prompt_loss, prompt_slices

    def forward(self, x: torch.Tensor, y: torch.Tensor, real: int, rng: np.random.Generator):
        emb = self.model.encode(x) if self.encode else x
        out = self.model.decode(emb)
        extra = None
        if self.prompt_loss is not None and real:
            extra = _prompt_loss(self.model, emb[:real], y[:real].cpu(), rng, self.prompt_loss, self.prompt_slices)
        return out, extra


def _fp32(value):
    """A floating tensor as float32; anything else as it is."""
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value


def _rank_rows(batch: np.ndarray, ctx: DistContext) -> tuple[np.ndarray, list[int]]:
    """Positions in the global batch of this rank's rows (DistributedSampler's interleaving), padded with
    position 0 to the largest rank's count so that every rank runs the same shapes; and every rank's real count."""
    positions = np.arange(len(batch))
    counts = [len(shard_rows(positions, DistContext(r, ctx.world_size))) for r in range(ctx.world_size)]
    mine = np.asarray(shard_rows(positions, ctx), dtype=np.int64)
    return np.concatenate([mine, np.zeros(max(counts) - len(mine), dtype=np.int64)]), counts


def _gathered(out: dict[str, torch.Tensor], y: torch.Tensor, counts: list[int], ctx: DistContext):
    """Head outputs and labels of the whole global batch (the pooled Dice needs all of them)."""
    keys = ("logits", "low_res_logits")
    return {k: gather_rows(v, ctx, counts) for k, v in out.items() if k in keys}, gather_rows(y, ctx, counts)


def finetune(
    model: Segmenter,
    train: LabeledSlices,
    config: FinetuneConfig,
    val: LabeledSlices | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_encode: Callable[[int, int], None] | None = None,
) -> dict:
    """Train the stage-2 parameters; keep the weights of the best validation epoch. Returns the history.

    `on_encode(done, total)` reports the cached mode's one-off encoding of slices not encoded before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        return _finetune(model, train, config, val, on_epoch, should_stop, on_encode)
    finally:
        torch.set_num_threads(threads)


def _check_set(train: LabeledSlices, val: LabeledSlices | None, train_emb, val_emb, limit: int):
    """(slices, embeddings) the best epoch is chosen on: the validation set, else evenly spaced training slices."""
    if val is not None and len(val):
        return val, val_emb
    pick = np.unique(np.linspace(0, len(train) - 1, min(limit, len(train))).round().astype(int))
    return train.subset(pick), (train_emb[pick] if train_emb is not None else None)


def _finetune(model, train, config, val, on_epoch, should_stop, on_encode) -> dict:
    if len(train) == 0:
        raise ValueError("no labelled slices to train on: every label volume is empty")
    ctx = context()
    if ctx.enabled and config.mode == "cached" and not config.embedding_dir:
        raise ValueError("cached mode on several processes needs an embedding_dir that every rank can read")
    with tempfile.TemporaryDirectory(prefix="samora-embeddings-") as scratch:
        root = config.embedding_dir or scratch  # kept until training ends: embeddings are read per batch
        return _train_loop(model, train, config, val, on_epoch, should_stop, on_encode, ctx, root)


def _train_loop(model, train, config, val, on_epoch, should_stop, on_encode, ctx, root) -> dict:
    device = torch.device(config.device)
    model.to(device)
    start = time.perf_counter()
    cached = config.mode == "cached"
    model.set_stage("finetune-heads" if cached else "finetune")
    if not ctx.is_main:
        on_epoch = on_encode = None  # progress comes from rank 0
    train_emb = _embed_for_training(model, train, config, root, ctx, on_encode) if cached else None
    val_emb = _embed_for_training(model, val, config, root, ctx, on_encode) if cached else None
    encode_s = time.perf_counter() - start
    stepper = _Stepper(model, train, config, train_emb, ctx)
    check, check_emb = _check_set(train, val, train_emb, val_emb, config.max_check_slices)
    # the best epoch is chosen on the validation slices, or on training slices when there are none
    dice_on = "validation" if val is not None and len(val) else "training"
    history: list[dict] = []
    best = {"metric": -math.inf, "epoch": -1, "state": None}
    for epoch in range(config.epochs):
        losses = stepper.epoch(epoch, should_stop)
        with training_autocast(config.precision, device):
            metric = evaluate_slices(model, check, config.batch_size, device, check_emb)
        record = {
            "epoch": epoch + 1,
            "total_epochs": config.epochs,
            "loss": float(np.mean(losses)),
            "selection_dice": metric,  # Dice of the best-epoch choice, measured on `dice_on` slices
            "dice_on": dice_on,
            "step": stepper.step,
            "elapsed_s": time.perf_counter() - start,
        }
        history.append(record)
        if ctx.is_main:
            log.info("epoch %d/%d loss %.4f %s dice %.4f", epoch + 1, config.epochs, record["loss"], dice_on, metric)
        if not math.isnan(metric) and metric > best["metric"]:
            best = {"metric": metric, "epoch": epoch + 1, "state": copy.deepcopy(model.saved_state())}
        if on_epoch is not None:
            on_epoch({**record, "best_metric": best["metric"]})
        if stepper.step >= stepper.total or any_rank(bool(should_stop and should_stop()), ctx):
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    model.set_stage("inference")
    model.eval()
    return {
        "history": history,
        "best_metric": best["metric"],
        "best_epoch": best["epoch"],
        "steps": stepper.step,
        "total_time": time.perf_counter() - start,
        "encode_time": encode_s,
        "mode": config.mode,
    }


class _Stepper:
    """The optimiser steps of stage 2: optimiser, LR schedule, losses and the per-step random streams."""

    def __init__(self, model: Segmenter, train: LabeledSlices, config: FinetuneConfig, embeddings, ctx) -> None:
        cached = config.mode == "cached"
        self.model, self.train, self.config, self.ctx = model, train, config, ctx
        self.params = model.trainable_parameters()
        self.optimizer = _optimizer(model, config)
        total = math.ceil(len(train) / config.batch_size) * config.epochs
        self.total = min(total, config.max_steps) if config.max_steps else total
        schedule = warmup_poly(self.total, warmup_steps(self.total, config.warmup_fraction))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.seg_loss = SegmentationLoss(config.ce_weight)
        self.batches = _Batches(train, config, embeddings)
        self.order_rng = np.random.default_rng(config.seed)  # the same epoch orders on every rank
        self.prompt_rng = np.random.default_rng([config.seed, 1, ctx.rank])  # simulated prompts: per rank
        self.hsam = model.config.decoder == "hsam"
        has_prompt = config.prompt_training and model.prompt_head is not None
        prompt_loss = PromptLoss() if has_prompt else None
        # find_unused: a step may leave the prompt path unused (no prompt on a rank's rows, or prompt training off)
        step_module = _StepModule(model, not cached, prompt_loss, config.prompt_slices)
        self.step_module = wrap_ddp(step_module, ctx, find_unused=True)
        self.step = 0

    def epoch(self, epoch: int, should_stop: Callable[[], bool] | None) -> list[float]:
        """One pass over the training slices in a fresh order (fewer steps at the step limit or on a stop);
        returns each step's loss averaged over ranks."""
        config, ctx = self.config, self.ctx
        self.model.train()
        order = self.order_rng.permutation(len(self.train))
        losses = []
        for b in range(0, len(order), config.batch_size):
            batch = order[b : b + config.batch_size]
            positions, counts = _rank_rows(batch, ctx)
            x, y = self.batches(batch[positions], [_sample_seed(config.seed, self.step, int(p)) for p in positions])
            with training_autocast(config.precision, config.device):
                out, extra = self.step_module(x, y, counts[ctx.rank], self.prompt_rng)
            out = {k: _fp32(v) for k, v in out.items()}  # the losses in fp32 whatever the forward's precision
            loss = self.seg_loss(*_gathered(out, y, counts, ctx), epoch, self.hsam)
            if extra is not None:
                loss = loss + extra.float()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            losses.append(mean_over_ranks(float(loss.detach()), ctx))
            self.step += 1
            if self.step >= self.total or any_rank(bool(should_stop and should_stop()), ctx):
                break
        return losses
