"""The stage-1 loop: train one expert (and its objective's head) at a time on slices streamed from a SliceCache.

Everything random in a step is derived from (seed, level, step) (samora.ssl.batches). Together with the checkpoint
(expert, head, optimiser, scheduler, step, RNG state; samora.ssl.checkpoint) this makes an interrupted run
continue exactly where it stopped. `pretrain` (samora.ssl.pretraining) runs this for each requested level.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader

from samora.adapters.experts import expert_parameters, expert_state, load_expert_state
from samora.config import DEFAULT_SSL_EPOCHS, EXPERTS, SSLSettings
from samora.distributed.context import any_rank, context, main_first, mean_over_ranks, wrap_ddp
from samora.engine.precision import training_autocast
from samora.plots import read_loss_log
from samora.schedule import warmup_poly, warmup_steps
from samora.ssl.batches import BatchMaker, ObjectiveStep, StepBatches, step_generator
from samora.ssl.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    load_checkpoint,
    log_path,
    mean_loss,
    model_signature,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_log,
)
from samora.ssl.experts_io import expert_paths, save_expert
from samora.ssl.heldout import heldout_loss, heldout_record
from samora.ssl.objectives import OBJECTIVES, SSLObjective, build_objective

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunHooks",
    "SILENT",
    "SSLSettings",
    "checkpoint_path",
    "log_path",
    "total_steps_for",
    "train_expert",
    "warmup_poly",
]

OnStep = Callable[[str, int, int, float], None]


def quiet(message: str) -> None:
    """The log of ranks other than 0."""


@dataclass(frozen=True)
class RunHooks:
    """How a stage-1 run reports and is stopped: a progress bar, log lines, `on_step(level, step, total, loss)`
    after every step (after its checkpoint, if any), and `stop()`, which checkpoints and ends the run early."""

    progress: bool = True
    log: Callable[[str], None] = print
    on_step: OnStep | None = None
    stop: Callable[[], bool] | None = None


SILENT = RunHooks(progress=False, log=quiet)


def total_steps_for(n_slices: int, batch_size: int, epochs: int | None, max_steps: int | None) -> int:
    """Steps of a run: `epochs` full passes (default 30), capped by `max_steps`; or `max_steps` alone."""
    per_epoch = max(1, n_slices // max(1, min(batch_size, n_slices)))
    if epochs is None and max_steps is not None:
        return int(max_steps)
    total = (epochs if epochs is not None else DEFAULT_SSL_EPOCHS) * per_epoch
    return int(min(total, max_steps)) if max_steps is not None else int(total)


def train_expert(
    model: nn.Module,
    level: str,
    cache: Any,
    out_dir: str | Path,
    total_steps: int,
    settings: SSLSettings | None = None,
    hooks: RunHooks | None = None,
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
    `hooks`: progress bar, log, per-step callback and stop request (RunHooks; a stop returns status "stopped").
    """
    hooks = hooks or RunHooks()
    run = _ExpertRun(
        model=model,
        level=level,
        cache=cache,
        out_dir=Path(out_dir),
        total_steps=total_steps,
        settings=settings or SSLSettings(),
        hooks=hooks,
        device=device,
    )
    run.build(teacher, objective_options)
    run.resume(heldout)
    status = run.train()
    summary = run.summary(status)
    if status == "finished":
        run.finish(summary, metadata)
    model.set_stage("inference")
    return summary


class _ExpertRun:
    """The state of one level's run, and its steps: build, resume, train, summarise, finish."""

    def __init__(
        self,
        model: nn.Module,
        level: str,
        cache: Any,
        out_dir: Path,
        total_steps: int,
        settings: SSLSettings,
        hooks: RunHooks,
        device: str | torch.device | None,
    ) -> None:
        if level not in EXPERTS:
            raise ValueError(f"unknown SSL level {level!r}; choose one of {EXPERTS}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        n = len(cache)
        if n < 2:
            raise ValueError(f"the slice cache has {n} informative slices; self-supervised training needs at least 2")
        self.ctx = context()
        self.batch_size = min(settings.batch_size, n)
        if self.batch_size % self.ctx.world_size:
            raise ValueError(f"batch size {self.batch_size} does not split evenly over {self.ctx.world_size} processes")
        self.model, self.level, self.cache, self.out_dir = model, level, cache, out_dir
        self.total, self.settings, self.hooks = total_steps, settings, hooks
        self.log = hooks.log if self.ctx.is_main else quiet
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.ckpt, self.losses_path = checkpoint_path(out_dir, level), log_path(out_dir, level)
        self.step, self.elapsed_before, self.steps_this_run, self.seconds = 0, 0.0, 0, 0.0
        self.heldout, self.heldout_start = None, None

    def build(self, teacher: nn.Module | None, objective_options: dict[str, Any] | None) -> None:
        """The objective (seeded head), the optimiser over expert and head, and the LR schedule."""
        model, settings = self.model, self.settings
        model.to(self.device).eval()  # the frozen encoder has no dropout/batch-norm, so eval only pins its behaviour
        model.set_stage(f"ssl-{self.level}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # the head's initialisation is part of the run's reproducibility
            self.objective = build_objective(self.level, model, teacher=teacher, **(objective_options or {}))
        self.objective.to(self.device).train()
        expert = expert_parameters(model.backbone.encoder, self.level)
        groups = _param_groups(expert, self.objective, settings.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr)
        warmup = warmup_steps(self.total, settings.warmup_fraction)
        schedule = warmup_poly(self.total, warmup, settings.poly_power)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def resume(self, heldout: Any) -> None:
        """Continue from the level's checkpoint if there is a usable one; measure or read the step-0 held-out loss."""
        level = self.level
        signature = model_signature(self.model.config)
        state = load_checkpoint(self.ckpt, level, signature, self.cache.data_hash, self.log)
        if state is not None:
            load_expert_state(self.model.backbone.encoder, level, state["expert"])
            try:
                self.objective.load_state_dict(state["head"])
            except RuntimeError as e:
                raise ValueError(
                    f"{self.ckpt}: its {level} head does not fit this run's objective (started with different "
                    f"objective options or with/without a teacher?); delete it to restart: {e}"
                ) from e
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.step, self.elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
            if int(state["total_steps"]) != self.total:
                self.log(f"[{level}] checkpoint was for {state['total_steps']} steps, continuing to {self.total}")
            self.log(f"[{level}] resuming from {self.ckpt} at step {self.step}/{self.total}")
            if self.ctx.is_main:
                truncate_log(self.losses_path, self.step)
        elif self.losses_path.exists() and self.ctx.is_main:
            self.losses_path.unlink()  # a log without a usable checkpoint belongs to a run that never reached one
        if heldout is not None:
            self.heldout = heldout
            self.heldout_start = self._heldout_start(state)

    def _heldout_start(self, state: dict[str, Any] | None) -> float | None:
        """The held-out loss before the first step: measured on a fresh run, read from the checkpoint on a resume."""
        if self.step == 0:
            return self._heldout_loss()
        stored = (state or {}).get("heldout") or {}
        if stored.get("data_hash") == self.heldout.data_hash and stored.get("step0_loss") is not None:
            return float(stored["step0_loss"])
        self.log(
            f"[{self.level}] resumed without a step-0 held-out loss for these studies; only the end value is measured"
        )
        return None

    def _heldout_loss(self) -> float:
        s = self.settings
        return heldout_loss(self.model, self.objective, self.heldout, s.batch_size, max_slices=s.heldout_slices)

    def save_checkpoint(self, elapsed: float) -> None:
        """Checkpoint the current step (rank 0 writes it: every rank holds the same state)."""
        if not self.ctx.is_main:
            return
        held = self.heldout
        state = {
            "level": self.level,
            "step": self.step,
            "total_steps": self.total,
            "elapsed": elapsed,
            "model": model_signature(self.model.config),
            "data_hash": self.cache.data_hash,
            "settings": asdict(self.settings),
            "expert": expert_state(self.model.backbone.encoder, self.level),
            "head": {k: v.detach().cpu() for k, v in self.objective.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            # the step-0 value cannot be measured again after a resume, so it travels with the checkpoint
            "heldout": {"data_hash": held.data_hash, "step0_loss": self.heldout_start} if held is not None else None,
        }
        save_checkpoint(self.ckpt, state)

    def train(self) -> str:
        """Run the remaining steps; returns "finished" or "stopped"."""
        settings, level, ctx, hooks = self.settings, self.level, self.ctx, self.hooks
        loader = DataLoader(
            BatchMaker(self.cache, self.objective.preparer),
            sampler=StepBatches(len(self.cache), self.batch_size, settings.seed, level, self.step, self.total, ctx),
            batch_size=None,  # the sampler hands out whole batches
            num_workers=settings.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        step_module = wrap_ddp(ObjectiveStep(self.model, self.objective), ctx)
        status = "finished" if self.step >= self.total else "running"
        self.started = time.perf_counter()
        bar = _progress_bar(hooks.progress and ctx.is_main, self.total, self.step, f"ssl {level}")
        self.losses_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.losses_path if ctx.is_main else os.devnull, "a") as log_file:
                for batch in loader:
                    value, elapsed = self._step(step_module, batch, log_file, bar)
                    if self.step % settings.checkpoint_every == 0 and self.step < self.total:
                        self.save_checkpoint(elapsed)
                    if hooks.on_step is not None and ctx.is_main:
                        hooks.on_step(level, self.step, self.total, value)
                    if hooks.stop is not None and self.step < self.total and any_rank(hooks.stop(), ctx):
                        self.save_checkpoint(elapsed)
                        status = "stopped"
                        self.log(f"[{level}] stopped at step {self.step}/{self.total}; the next run resumes from here")
                        break
                else:
                    status = "finished"
        finally:
            if bar is not None:
                bar.close()
        self.seconds = time.perf_counter() - self.started
        return status

    def _step(self, step_module: nn.Module, batch: Any, log_file: TextIO, bar: Any) -> tuple[float, float]:
        """One optimiser step and its loss-log line; returns (loss averaged over ranks, elapsed seconds)."""
        settings, ctx = self.settings, self.ctx
        generator = step_generator(settings.seed, self.level, self.step)
        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        lr = self.optimizer.param_groups[0]["lr"]
        with training_autocast(settings.precision, self.device):
            terms = step_module(batch, generator)
        loss = terms["loss"].float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{self.level}] non-finite loss {loss.item()} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.steps_this_run += 1
        value = mean_over_ranks(float(loss.detach()), ctx)
        elapsed = self.elapsed_before + time.perf_counter() - self.started
        per_epoch = max(1, len(self.cache) // self.batch_size)
        record = {"step": self.step, "epoch": (self.step - 1) // per_epoch, "loss": value, "lr": lr, "time": elapsed}
        record.update({k: mean_over_ranks(float(v), ctx) for k, v in terms.items() if k != "loss"})
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        return value, elapsed

    def summary(self, status: str) -> dict[str, Any]:
        """What the run did (losses from the log, speed of this process's steps)."""
        records = read_loss_log(self.losses_path) if self.losses_path.exists() and self.ctx.is_main else []
        seconds, done = self.seconds, self.steps_this_run
        return {
            "level": self.level,
            "objective": OBJECTIVES[self.level],
            "status": status,
            "steps": self.step,
            "total_steps": self.total,
            "batch_size": self.batch_size,
            "epochs": round(self.step * self.batch_size / len(self.cache), 3),
            "first_loss": mean_loss(records[:10]),
            "final_loss": mean_loss(records[-10:]),
            "seconds": round(seconds, 2),
            "slices_per_second": round(done * self.batch_size / seconds, 2) if done and seconds else None,
            "log_file": str(self.losses_path),
        }

    def finish(self, summary: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        """Final checkpoint, held-out loss at the end, and the expert file with its metadata."""
        level, cache = self.level, self.cache
        self.save_checkpoint(self.elapsed_before + self.seconds)
        if self.heldout is not None:
            end = self._heldout_loss()
            summary["heldout"] = heldout_record(self.heldout, self.heldout_start, end, self.settings)
            self.log(
                f"[{level}] held-out loss on {self.heldout.study_ids}: {_format(self.heldout_start)} at step 0 "
                f"-> {end:.4f}"
            )
        meta = {
            "objective": OBJECTIVES[level],
            "objective_settings": self.objective.settings(),
            "steps": self.step,
            "epochs": summary["epochs"],
            "final_loss": summary["final_loss"],
            "first_loss": summary["first_loss"],
            "study_ids": list(cache.study_ids),
            "data_hash": cache.data_hash,
            "n_slices": len(cache),
            "optimisation": asdict(self.settings),
            "model_config": self.model.config.to_dict(),
            **({"heldout": summary["heldout"]} if "heldout" in summary else {}),
            **(metadata or {}),
        }
        summary["expert_file"] = str(expert_paths(self.out_dir, level)[0])
        with main_first(self.ctx):  # the other ranks wait until the expert file exists
            if self.ctx.is_main:
                save_expert(self.model, level, self.out_dir, meta)
        if self.ctx.is_main:
            first, final = summary["first_loss"], summary["final_loss"]
            self.log(f"[{level}] done: {self.step} steps, loss {first:.4f} -> {final:.4f}")


def _param_groups(expert: dict[str, nn.Parameter], objective: SSLObjective, weight_decay: float) -> list[dict]:
    """Decay matrices (LoRA factors, linear/conv weights); leave biases, norms and the mask token alone."""
    decay, no_decay = list(expert.values()), []
    for _, p in objective.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
