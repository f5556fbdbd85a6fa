"""Stage-2 training on a datastore's final labels, as the app's `samora` trainer runs it: the held-out study, the
fine-tuning settings of a request, one or several processes, publication of the new version, and the progress
records the trainer shows (in MONAI Label's field names: epoch, total_epochs, best_metric, total_time)."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samora.engine.train import FinetuneConfig, LabeledSlices, finetune, hold_out_last_study, load_labeled_cases
from samora.serving.labels import remap_by_name

log = logging.getLogger(__name__)

__all__ = ["FinetuneRequest", "Progress", "finetune_and_publish", "hms", "starting_model"]

Case = tuple[str, str, str]  # (case id, image path, label path)


@dataclass
class FinetuneRequest:
    """What a training request may change."""

    epochs: int
    batch_size: int
    lr: float
    prompt_training: bool


def hms(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """The trainer's progress records, written through `write` (e.g. a stats file)."""

    def __init__(self, write: Callable[[dict], None], total_epochs: int, base_version: int) -> None:
        self.write, self.total_epochs, self.base_version = write, total_epochs, base_version
        self.start = time.time()

    def _record(self, **fields: Any) -> dict:
        return {
            "status": "RUNNING",
            "epoch": 0,
            "total_epochs": self.total_epochs,
            "best_metric": 0,
            **fields,
            "total_time": hms(time.time() - self.start),
            "start_ts": self.start,
            "base_version": self.base_version,
        }

    def started(self) -> None:
        self.write(self._record())

    def epoch(self, record: dict) -> None:
        """finetune's on_epoch."""
        self.write(
            self._record(
                epoch=record["epoch"],
                total_epochs=record["total_epochs"],
                best_metric=record["best_metric"],
                loss=record["loss"],
                dice=record["selection_dice"],
                dice_on=record["dice_on"],
            )
        )

    def encoding(self, done: int, total: int) -> None:
        """finetune's on_encode."""
        self.write(self._record(stage=f"encoding slices {done}/{total} (once; then cached on disk)"))
        log.info("encoded %d/%d training slices", done, total)

    def finished(self, result: dict, **extra: Any) -> dict:
        final = self._record(status="DONE", epoch=len(result["history"]), best_metric=result["best_metric"])
        final.update(extra, train_mode=result["mode"])
        self.write(final)
        return final


def starting_model(runtime: Any) -> tuple[int, Any]:
    """(served version, a copy of it to train), or a fresh model when the conf changed since that version.
    Where the experts act (§8.2 of docs/design.md) the SSL experts on disk replace the version's, since a bootstrap
    may have finished after it; in `cached` mode with HL-Attn fusion they cannot act and would only force every slice
    to be re-encoded."""
    from samora.ssl.experts_io import load_experts

    version, served = runtime.model()
    model = copy.deepcopy(served)  # never train the object a (sync) server is serving
    if model.config.to_dict() != runtime.settings.model_config().to_dict():
        # conf changed (labels, preset, size...) since that version: start from experts, not from it
        log.warning("model version %d was built with another configuration; training a fresh model", version)
        return version, runtime.fresh_model()
    store = runtime.store
    # stage 2 of `full` mode may train its own copies of the experts, which are then newer than the bootstrap's
    trains_experts = runtime.settings.resolved_train_mode() == "full" and model.config.finetune_experts
    if version and runtime.settings.experts_act() and not trains_experts and store.expert_files():
        loaded = load_experts(model, store.experts_dir)
        log.info("training from model version %d with the SSL experts on disk: %s", version, loaded)
    return version, model


def training_slices(
    cases: Sequence[Case], infos: dict[str, Any], labels: dict[str, int], image_size: int, context: str
) -> tuple[LabeledSlices, LabeledSlices | None]:
    """(training, validation or None) slices of the cases, their labels renumbered by name to `labels`."""
    slices = load_labeled_cases(
        cases, image_size, context, label_map=lambda arr, case: remap_by_name(arr, infos[case], labels)
    )
    return hold_out_last_study(slices, [c for c, _, _ in cases])


def finetune_config(runtime: Any, request: FinetuneRequest, nproc: int) -> FinetuneConfig:
    """The FinetuneConfig of a request on this server (mode, device, threads from its settings)."""
    settings = runtime.settings
    mode = settings.resolved_train_mode()
    cached = mode == "cached"
    return FinetuneConfig(
        epochs=request.epochs,
        batch_size=request.batch_size,
        lr=request.lr,
        prompt_training=request.prompt_training,
        device=settings.device,
        mode=mode,
        embedding_dir=str(runtime.store.root / "embeddings"),
        threads=max(1, (os.cpu_count() or 1) // nproc) if cached else None,
        prompt_slices=2 if cached and settings.pretrained else None,
        precision=settings.resolved_precision(through_encoder=not cached),
    )


def finetune_and_publish(
    runtime: Any,
    model: Any,
    version: int,
    cases: Sequence[Case],
    infos: dict[str, Any],
    request: FinetuneRequest,
    plan: Any,
    jobs_root: Path,
    write_stats: Callable[[dict], None],
) -> dict:
    """Fine-tune `model` (a copy of served `version`, or a fresh one) on the cases, in `plan`'s processes, and
    publish it as a new version; returns the final progress record."""
    from samora.distributed.jobs import run_finetune_job

    progress = Progress(write_stats, request.epochs, version)
    train, val = training_slices(
        cases, infos, dict(runtime.settings.labels), model.config.image_size, model.config.context
    )
    progress.started()
    config = finetune_config(runtime, request, plan.nproc)
    callbacks = {"on_epoch": progress.epoch, "on_encode": progress.encoding}
    if plan.launches:
        model, result = run_finetune_job(jobs_root, plan, model, train, val, config, callbacks)
    else:
        result = finetune(model, train, config, val=val, **callbacks)
    data_hash = hashlib.sha256("".join(f"{c}:{i}:{lab}" for c, i, lab in cases).encode()).hexdigest()
    metadata = {
        "trained_on": [c for c, _, _ in cases],
        "data_hash": data_hash,
        "best_metric": result["best_metric"],
        "history": result["history"],
        "base_version": version,
        "train_mode": result["mode"],
    }
    new_version = runtime.store.publish(model, metadata=metadata)
    final = progress.finished(result, model_version=new_version, labeled_studies=len(cases), processes=plan.nproc)
    log.info("published model version %d (best dice %.4f)", new_version, result["best_metric"])
    return final
