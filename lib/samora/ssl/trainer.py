"""The stage-1 loop: train one expert (and its objective's head) at a time on slices streamed from a SliceCache.

Everything random in a step is derived from (seed, level, step): which slices form the batch (a per-epoch
permutation), each sample's augmentation, and the objective's masks. Together with the checkpoint (expert, head,
optimiser, scheduler, step, RNG state) this makes an interrupted run continue exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import samora
from samora.adapters.experts import expert_parameters, expert_state, load_expert_state
from samora.config import EXPERTS, ModelConfig
from samora.distributed.context import (
    DistContext,
    any_rank,
    context,
    main_first,
    mean_over_ranks,
    rank_device,
    shard_rows,
    wrap_ddp,
)
from samora.io_utils import atomic_write, atomic_write_json
from samora.plots import plot_loss_curves, read_loss_log
from samora.ssl.augment import prepare_batch
from samora.ssl.experts_io import (
    ExpertFileError,
    check_compatible,
    expert_paths,
    load_experts,
    save_expert,
    verify_expert,
)
from samora.ssl.heldout import heldout_loss, heldout_record
from samora.ssl.objectives import OBJECTIVES, SSLObjective, build_objective, load_teacher

__all__ = [
    "CHECKPOINT_FORMAT",
    "SSLSettings",
    "checkpoint_path",
    "log_path",
    "pretrain",
    "total_steps_for",
    "train_expert",
    "warmup_poly",
]

CHECKPOINT_FORMAT = "samora-ssl-checkpoint/1"
DEFAULT_EPOCHS = 30  # the reference optimisation (docs/design.md §7)
PLOT_FILE = "loss_curves.png"
SUMMARY_FILE = "pretrain_summary.json"
logger = logging.getLogger(__name__)

OnStep = Callable[[str, int, int, float], None]
# Seed-sequence "positions" reserved for the per-epoch permutation and the objective's per-step generator
# (sample positions within a batch are 0..batch_size-1, far below these).
_PERMUTATION_STREAM = 2**32 - 1
_STEP_STREAM = 2**32 - 2


@dataclass
class SSLSettings:
    """Optimisation settings of one expert's run (recorded in its metadata and checkpoint)."""

    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of the total steps, at least one step
    poly_power: float = 0.9
    checkpoint_every: int = 100
    grad_clip: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    heldout_slices: int | None = None  # held-out evaluation on at most this many evenly spaced slices (None: all)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


def warmup_poly(total_steps: int, warmup_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """LR factor for optimizer step `s` (0-based): linear warm-up to 1, then (1 - progress)^power down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / span) ** power

    return factor


def checkpoint_path(out_dir: str | Path, level: str) -> Path:
    """Where the resumable checkpoint of `level` lives."""
    return Path(out_dir) / "checkpoints" / f"ssl_{level}.pt"


def log_path(out_dir: str | Path, level: str) -> Path:
    """The JSON-lines loss log of `level`."""
    return Path(out_dir) / f"loss_{level}.jsonl"


def total_steps_for(n_slices: int, batch_size: int, epochs: int | None, max_steps: int | None) -> int:
    """Steps of a run: `epochs` full passes (default 30), capped by `max_steps`; or `max_steps` alone."""
    per_epoch = max(1, n_slices // max(1, min(batch_size, n_slices)))
    if epochs is None and max_steps is not None:
        return int(max_steps)
    total = (epochs if epochs is not None else DEFAULT_EPOCHS) * per_epoch
    return int(min(total, max_steps)) if max_steps is not None else int(total)


# ----- data -----------------------------------------------------------------------------------------------------


def _sample_seed(seed: int, level: str, step: int, position: int) -> int:
    """A well-mixed 32-bit seed for one sample of one step."""
    return int(np.random.SeedSequence([seed, EXPERTS.index(level), step, position]).generate_state(1)[0])


class _StepBatches(Sampler):
    """Yields, for steps start..total-1, this rank's part of the global batch's [(slice index, sample seed), ...];
    full batches only. Seeds follow the sample's position in the global batch, so any number of ranks sees the
    same samples with the same augmentation as one process."""

    def __init__(
        self, n_slices: int, batch_size: int, seed: int, level: str, start: int, total: int, ctx: DistContext
    ) -> None:
        self.n = n_slices
        self.batch = batch_size
        self.seed = seed
        self.level = level
        self.start = start
        self.total = total
        self.ctx = ctx
        self.per_epoch = max(1, n_slices // batch_size)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm_epoch, perm = -1, None
        for step in range(self.start, self.total):
            epoch, position = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                generator = torch.Generator().manual_seed(
                    _sample_seed(self.seed, self.level, epoch, _PERMUTATION_STREAM)
                )
                perm, perm_epoch = torch.randperm(self.n, generator=generator).tolist(), epoch
            indices = perm[position * self.batch : (position + 1) * self.batch]
            keys = [(i, _sample_seed(self.seed, self.level, step, j)) for j, i in enumerate(indices)]
            yield shard_rows(keys, self.ctx)


class _BatchMaker(Dataset):
    """Reads a whole batch from the cache and prepares it (one call per batch keeps the per-sample ops cheap)."""

    def __init__(self, cache: Any, preparer: Callable[[torch.Tensor, int], tuple[torch.Tensor, ...]]) -> None:
        from samora.data import SliceDataset

        self.slices = SliceDataset(cache)
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        return prepare_batch(self.slices, self.preparer, keys)


class _ObjectiveStep(nn.Module):
    """The model and its objective as one module, so DistributedDataParallel sees every trainable parameter."""

    def __init__(self, model: nn.Module, objective: SSLObjective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Sequence[torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch, generator)


# ----- checkpoints ------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (so the checkpoint loads with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_signature(config: ModelConfig) -> dict[str, Any]:
    return {"preset": config.preset, "image_size": config.image_size, "rank": config.expert_rank}


# ----- one expert -------------------------------------------------------------------------------------------------


def train_expert(
    model: nn.Module,
    level: str,
    cache: Any,
    out_dir: str | Path,
    total_steps: int,
    settings: SSLSettings | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: OnStep | None = None,
    stop: Callable[[], bool] | None = None,
    teacher: nn.Module | None = None,
    objective_options: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    metadata: dict[str, Any] | None = None,
    heldout: Any = None,
) -> dict[str, Any]:
    """Train `level`'s expert for `total_steps` (resuming from its checkpoint if there is one); returns a summary.

    Writes the loss log, checkpoints every `settings.checkpoint_every` steps and at the end, then the expert file.
    `heldout`: a SliceCache of studies that take no part in training; the objective's loss on it is measured
    before the first step and at the end, and recorded in the summary and the expert metadata ("heldout").
    `on_step(level, step, total, loss)` is called after every step (after its checkpoint, if any); `stop()`
    returning True checkpoints and returns early with status "stopped".
    """
    if level not in EXPERTS:
        raise ValueError(f"unknown SSL level {level!r}; choose one of {EXPERTS}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    settings = settings or SSLSettings()
    out_dir = Path(out_dir)
    n = len(cache)
    if n < 2:
        raise ValueError(f"the slice cache has {n} informative slices; self-supervised training needs at least 2")
    batch_size = min(settings.batch_size, n)
    ctx = context()
    if batch_size % ctx.world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {ctx.world_size} processes")
    log = log if ctx.is_main else _quiet
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()  # the frozen encoder has no dropout/batch-norm, so eval only pins its behaviour
    model.set_stage(f"ssl-{level}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # the head's initialisation is part of the run's reproducibility
        objective = build_objective(level, model, teacher=teacher, **(objective_options or {}))
    objective.to(device).train()
    expert = expert_parameters(model.backbone.encoder, level)
    optimizer = torch.optim.AdamW(_param_groups(expert, objective, settings.weight_decay), lr=settings.lr)
    warmup = max(1, round(settings.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(total_steps, warmup, settings.poly_power))

    ckpt = checkpoint_path(out_dir, level)
    losses_path = log_path(out_dir, level)
    signature = _model_signature(model.config)
    step, elapsed_before = 0, 0.0
    state = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.is_file() else None
    if state is not None and _check_checkpoint(state, ckpt, level, signature) != cache.data_hash:
        # New or changed studies (e.g. the datastore grew): the half-trained expert belongs to other data.
        log(f"[{level}] {ckpt} was trained on different studies; restarting this level on the current ones")
        state = None
    if state is not None:
        load_expert_state(model.backbone.encoder, level, state["expert"])
        try:
            objective.load_state_dict(state["head"])
        except RuntimeError as e:
            raise ValueError(
                f"{ckpt}: its {level} head does not fit this run's objective (started with different objective "
                f"options or with/without a teacher?); delete it to restart: {e}"
            ) from e
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        if int(state["total_steps"]) != total_steps:
            log(f"[{level}] checkpoint was for {state['total_steps']} steps, continuing to {total_steps}")
        log(f"[{level}] resuming from {ckpt} at step {step}/{total_steps}")
        if ctx.is_main:
            _truncate_log(losses_path, step)
    elif losses_path.exists() and ctx.is_main:
        losses_path.unlink()  # a log without a usable checkpoint belongs to a run that never reached one
    heldout_start = _heldout_start(model, objective, heldout, state, step, settings, log) if heldout else None

    def save_checkpoint(done: int, elapsed: float) -> None:
        if not ctx.is_main:  # every rank holds the same state; one writes it
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "level": level,
            "step": done,
            "total_steps": total_steps,
            "elapsed": elapsed,
            "model": signature,
            "data_hash": cache.data_hash,
            "settings": asdict(settings),
            "expert": expert_state(model.backbone.encoder, level),
            "head": {k: v.detach().cpu() for k, v in objective.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            # the step-0 value cannot be measured again after a resume, so it travels with the checkpoint
            "heldout": {"data_hash": heldout.data_hash, "step0_loss": heldout_start} if heldout else None,
        }
        atomic_write(ckpt, lambda tmp: torch.save(state, tmp))

    loader = DataLoader(
        _BatchMaker(cache, objective.preparer),
        sampler=_StepBatches(n, batch_size, settings.seed, level, step, total_steps, ctx),
        batch_size=None,  # the sampler hands out whole batches
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
    )
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    step_module = wrap_ddp(_ObjectiveStep(model, objective), ctx)
    per_epoch = max(1, n // batch_size)
    status = "finished" if step >= total_steps else "running"
    started = time.perf_counter()
    steps_this_run = 0
    bar = _progress_bar(progress and ctx.is_main, total_steps, step, f"ssl {level}")
    losses_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(losses_path if ctx.is_main else os.devnull, "a") as log_file:
            for batch in loader:
                generator = torch.Generator().manual_seed(_sample_seed(settings.seed, level, step, _STEP_STREAM))
                batch = tuple(t.to(device, non_blocking=True) for t in batch)
                lr = optimizer.param_groups[0]["lr"]
                terms = step_module(batch, generator)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"[{level}] non-finite loss {loss.item()} at step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                steps_this_run += 1
                value = mean_over_ranks(float(loss.detach()), ctx)
                elapsed = elapsed_before + time.perf_counter() - started
                record = {"step": step, "epoch": (step - 1) // per_epoch, "loss": value, "lr": lr, "time": elapsed}
                record.update({k: mean_over_ranks(float(v), ctx) for k, v in terms.items() if k != "loss"})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                if step % settings.checkpoint_every == 0 and step < total_steps:
                    save_checkpoint(step, elapsed)
                if on_step is not None and ctx.is_main:
                    on_step(level, step, total_steps, value)
                if stop is not None and step < total_steps and any_rank(stop(), ctx):
                    save_checkpoint(step, elapsed)
                    status = "stopped"
                    log(f"[{level}] stopped at step {step}/{total_steps}; the next run resumes from here")
                    break
            else:
                status = "finished"
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    records = read_loss_log(losses_path) if losses_path.exists() and ctx.is_main else []
    summary: dict[str, Any] = {
        "level": level,
        "objective": OBJECTIVES[level],
        "status": status,
        "steps": step,
        "total_steps": total_steps,
        "batch_size": batch_size,
        "epochs": round(step * batch_size / n, 3),
        "first_loss": _mean_loss(records[:10]),
        "final_loss": _mean_loss(records[-10:]),
        "seconds": round(seconds, 2),
        "slices_per_second": round(steps_this_run * batch_size / seconds, 2) if steps_this_run and seconds else None,
        "log_file": str(losses_path),
    }
    if status == "finished":
        save_checkpoint(step, elapsed_before + seconds)
        if heldout is not None:
            end = heldout_loss(model, objective, heldout, settings.batch_size, max_slices=settings.heldout_slices)
            summary["heldout"] = heldout_record(heldout, heldout_start, end, settings)
            log(f"[{level}] held-out loss on {heldout.study_ids}: {_format(heldout_start)} at step 0 -> {end:.4f}")
        meta = {
            "objective": OBJECTIVES[level],
            "objective_settings": objective.settings(),
            "steps": step,
            "epochs": summary["epochs"],
            "final_loss": summary["final_loss"],
            "first_loss": summary["first_loss"],
            "study_ids": list(cache.study_ids),
            "data_hash": cache.data_hash,
            "n_slices": n,
            "optimisation": asdict(settings),
            "model_config": model.config.to_dict(),
            **({"heldout": summary["heldout"]} if "heldout" in summary else {}),
            **(metadata or {}),
        }
        summary["expert_file"] = str(expert_paths(out_dir, level)[0])
        with main_first(ctx):  # the other ranks wait until the expert file exists
            if ctx.is_main:
                save_expert(model, level, out_dir, meta)
        if ctx.is_main:
            log(f"[{level}] done: {step} steps, loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    model.set_stage("inference")
    return summary


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _param_groups(expert: dict[str, nn.Parameter], objective: SSLObjective, weight_decay: float) -> list[dict]:
    """Decay matrices (LoRA factors, linear/conv weights); leave biases, norms and the mask token alone."""
    decay, no_decay = list(expert.values()), []
    for _, p in objective.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _heldout_start(
    model: nn.Module,
    objective: SSLObjective,
    heldout: Any,
    state: dict[str, Any] | None,
    step: int,
    settings: SSLSettings,
    log: Callable[[str], None],
) -> float | None:
    """The held-out loss before the first step: measured now on a fresh run, read from the checkpoint on a resume."""
    if step == 0:
        return heldout_loss(model, objective, heldout, settings.batch_size, max_slices=settings.heldout_slices)
    stored = (state or {}).get("heldout") or {}
    if stored.get("data_hash") == heldout.data_hash and stored.get("step0_loss") is not None:
        return float(stored["step0_loss"])
    log(f"[{objective.level}] resumed without a step-0 held-out loss for these studies; only the end value is measured")
    return None


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _check_checkpoint(state: Any, path: Path, level: str, signature: dict) -> str:
    """Validate a checkpoint for this level and model; returns the data hash it was trained on."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("level") != level:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint for level {level!r}; delete it to restart")
    if state.get("model") != signature:
        raise ValueError(
            f"{path} was written for model {state.get('model')}, this run uses {signature}; "
            "use another output folder or delete the checkpoint"
        )
    return str(state.get("data_hash"))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step` (the steps after the checkpoint are about to be redone)."""
    if not path.exists():
        return
    kept = [r for r in read_loss_log(path) if r.get("step", 0) <= step]

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    atomic_write(path, write)


def _mean_loss(records: Sequence[dict]) -> float | None:
    values = [r["loss"] for r in records if "loss" in r]
    return float(sum(values) / len(values)) if values else None


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


# ----- all levels -------------------------------------------------------------------------------------------------


def pretrain(
    studies: str | Path | Sequence[str | Path] | Any,
    out_dir: str | Path,
    model_config: ModelConfig | dict[str, Any],
    levels: Sequence[str] = EXPERTS,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    progress: bool = True,
    log: Callable[[str], None] = print,
    teacher: str | Path | nn.Module | None = None,
    num_workers: int = 0,
    on_step: OnStep | None = None,
    stop: Callable[[], bool] | None = None,
    weight_decay: float = 0.1,
    checkpoint_every: int = 100,
    seed: int = 0,
    window: Any = None,
    device: str | torch.device | None = None,
    teacher_arch: str = "resnet50",
    objective_options: dict[str, dict[str, Any]] | None = None,
    model: nn.Module | None = None,
    heldout: str | Path | Sequence[str | Path] | Any = None,
    heldout_slices: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the requested experts in the order image, patch, pixel; finished levels are skipped, others resume.

    `studies`: a folder of studies, a list of study paths, an existing slice-cache folder, or a SliceCache. New
    caches go to OUT/cache. Writes OUT/expert_<level>.{safetensors,json}, OUT/loss_<level>.jsonl,
    OUT/loss_curves.png and OUT/pretrain_summary.json. Returns a summary per level.
    `heldout`: studies (same forms as `studies`, cached in OUT/heldout_cache) that take no part in training; each
    level's loss on them at step 0 and at the end goes into its summary and expert metadata.
    """
    from samora.model import SamoraModel

    config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(dict(model_config))
    unknown = [level for level in levels if level not in EXPERTS]
    if unknown or not levels:
        raise ValueError(f"levels must be a non-empty subset of {EXPERTS}, got {list(levels)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = context()
    log = log if ctx.is_main else _quiet
    with main_first(ctx):  # rank 0 builds the slice caches; the other ranks then open them
        cache = _resolve_cache(studies, out_dir / "cache", config, window, progress and ctx.is_main)
        heldout_cache = None
        if heldout is not None:
            heldout_cache = _resolve_cache(heldout, out_dir / "heldout_cache", config, window, False)
    if heldout_cache is not None and heldout_cache.data_hash == cache.data_hash:
        raise ValueError("the held-out studies are the training studies; hold out studies that SSL does not see")
    if model is None:
        model = SamoraModel(config)
    elif model.config.to_dict() != config.to_dict():
        raise ValueError("`model` was built from a different config than `model_config`")
    device = rank_device(str(device) if device is not None else None)
    settings = SSLSettings(
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        checkpoint_every=checkpoint_every,
        seed=seed,
        num_workers=num_workers,
        heldout_slices=heldout_slices,
    )
    total = total_steps_for(len(cache), batch_size, epochs, max_steps)
    order = [lv for lv in EXPERTS if lv in levels]
    log(
        f"pretraining {order} on {len(cache)} slices from {len(cache.study_ids)} studies: "
        f"{total} steps per level, batch {min(batch_size, len(cache))}"
    )

    summaries: dict[str, dict[str, Any]] = {}
    for level in order:
        weights_file, meta_file = expert_paths(out_dir, level)
        done = _finished_expert(out_dir, level, model)
        if done is not None:
            load_experts(model, out_dir, [level])
            log(
                f"[{level}] expert already trained ({done.get('steps')} steps, final loss {done.get('final_loss')}); "
                f"skipping. Delete {meta_file} to retrain."
            )
            summaries[level] = {
                "level": level,
                "status": "skipped",
                "steps": done.get("steps"),
                "final_loss": done.get("final_loss"),
                "expert_file": str(weights_file),
            }
            continue
        teacher_module = _resolve_teacher(teacher, teacher_arch) if level == "image" else None
        extra = {"teacher": _teacher_info(teacher)} if teacher_module is not None else {}
        summaries[level] = train_expert(
            model,
            level,
            cache,
            out_dir,
            total,
            settings,
            progress=progress,
            log=log,
            on_step=on_step,
            stop=stop,
            teacher=teacher_module,
            objective_options=(objective_options or {}).get(level),
            device=device,
            metadata=extra,
            heldout=heldout_cache,
        )
        if summaries[level]["status"] == "stopped":
            break

    logs = {level: log_path(out_dir, level) for level in EXPERTS if log_path(out_dir, level).exists()}
    if logs and ctx.is_main:
        plot_loss_curves(logs, out_dir / PLOT_FILE)
    summary = {
        "levels": summaries,
        "model_config": config.to_dict(),
        "samora_version": samora.__version__,
        "data_hash": cache.data_hash,
        "study_ids": cache.study_ids,
    }
    if ctx.is_main:
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summaries


def _finished_expert(out_dir: Path, level: str, model: nn.Module) -> dict[str, Any] | None:
    """Metadata of a valid, compatible finished expert; None if there is none (a broken one is reported)."""
    _, meta_path = expert_paths(out_dir, level)
    if not meta_path.exists():
        return None
    try:
        meta = verify_expert(out_dir, level)
    except ExpertFileError as e:
        logger.warning("%s; retraining %s", e, level)
        return None
    check_compatible(meta, model, meta_path)  # a different model in the same folder is an error, not a retrain
    return meta


def _resolve_cache(studies: Any, cache_dir: Path, config: ModelConfig, window: Any, progress: bool) -> Any:
    """A SliceCache at the model's size and context from whatever `studies` is."""
    from samora.data import SliceCache, discover_studies

    if isinstance(studies, SliceCache):
        cache = studies
    elif isinstance(studies, (str, os.PathLike)) and (Path(studies) / "index.json").is_file():
        cache = SliceCache.open(studies)
    else:
        if isinstance(studies, (str, os.PathLike)):
            path = Path(studies)
            paths = discover_studies(path) if path.is_dir() else [path]
        else:
            paths = [Path(p) for p in studies]
        if not paths:
            raise FileNotFoundError(f"no studies found in {studies}")
        cache = SliceCache.build(
            paths, cache_dir, size=config.image_size, context=config.context, window=window, progress=progress
        )
    if cache.size != config.image_size or cache.context != config.context:
        raise ValueError(
            f"slice cache {cache.cache_dir} holds {cache.size}px {cache.context!r} slices, "
            f"the model needs {config.image_size}px {config.context!r}"
        )
    if len(cache) == 0:
        raise ValueError(f"slice cache {cache.cache_dir} has no informative slices (all studies empty or skipped)")
    return cache


def _resolve_teacher(teacher: str | Path | nn.Module | None, arch: str) -> nn.Module | None:
    if teacher is None:
        return None
    if isinstance(teacher, nn.Module):
        return teacher
    return load_teacher(teacher, arch)


def _teacher_info(teacher: str | Path | nn.Module) -> dict[str, Any]:
    from samora.io_utils import sha256_file

    if isinstance(teacher, nn.Module):
        return {"source": type(teacher).__name__}
    return {"source": str(teacher), "sha256": sha256_file(teacher)}
