"""`pretrain`: the experts of the requested levels, in the order image, patch, pixel, on one set of studies."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samora
from samora.config import EXPERTS, ModelConfig, SSLSettings, expert_levels
from samora.distributed.context import context, main_first, rank_device
from samora.io_utils import atomic_write_json
from samora.plots import plot_loss_curves
from samora.ssl.checkpoint import log_path
from samora.ssl.experts_io import ExpertFileError, check_compatible, expert_paths, load_experts, verify_expert
from samora.ssl.objectives import load_teacher
from samora.ssl.trainer import RunHooks, quiet, total_steps_for, train_expert

__all__ = ["PLOT_FILE", "SUMMARY_FILE", "pretrain"]

PLOT_FILE = "loss_curves.png"
SUMMARY_FILE = "pretrain_summary.json"
logger = logging.getLogger(__name__)


def pretrain(
    studies: str | Path | Sequence[str | Path] | Any,
    out_dir: str | Path,
    model_config: ModelConfig | dict[str, Any],
    settings: SSLSettings | dict[str, Any] | None = None,
    *,
    levels: str | Sequence[str] = EXPERTS,
    epochs: int | None = None,
    max_steps: int | None = None,
    window: Any = None,
    teacher: str | Path | nn.Module | None = None,
    teacher_arch: str = "resnet50",
    objective_options: dict[str, dict[str, Any]] | None = None,
    model: nn.Module | None = None,
    heldout: str | Path | Sequence[str | Path] | Any = None,
    device: str | torch.device | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the requested experts in the order image, patch, pixel; finished levels are skipped, others resume.

    `studies`: a folder of studies, a list of study paths, an existing slice-cache folder, or a SliceCache. New
    caches go to OUT/cache. `settings`: the optimisation settings (an SSLSettings or its dict form), the same for
    every level; each level runs `epochs` (default 30) passes over the slices, capped by `max_steps`. Writes
    OUT/expert_<level>.{safetensors,json}, OUT/loss_<level>.jsonl, OUT/loss_curves.png and
    OUT/pretrain_summary.json. Returns a summary per level.
    `heldout`: studies (same forms as `studies`, cached in OUT/heldout_cache) that take no part in training; each
    level's loss on them at step 0 and at the end goes into its summary and expert metadata.
    `hooks`: progress bar, log, per-step callback and stop request (samora.ssl.trainer.RunHooks).
    """
    config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(dict(model_config))
    settings = settings if isinstance(settings, SSLSettings) else SSLSettings(**(settings or {}))
    order = expert_levels(levels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = context()
    hooks = hooks or RunHooks()
    if not ctx.is_main:
        hooks = replace(hooks, log=quiet, progress=False)
    log = hooks.log
    cache, heldout_cache = _caches(studies, heldout, out_dir, config, window, hooks.progress)
    model = _model_for(config, model)
    total = total_steps_for(len(cache), settings.batch_size, epochs, max_steps)
    log(
        f"pretraining {list(order)} on {len(cache)} slices from {len(cache.study_ids)} studies: "
        f"{total} steps per level, batch {min(settings.batch_size, len(cache))}"
    )
    device = rank_device(str(device) if device is not None else None)
    run = dict(hooks=hooks, device=device, heldout=heldout_cache)
    summaries: dict[str, dict[str, Any]] = {}
    for level in order:
        options = (objective_options or {}).get(level)
        summaries[level] = _skip_finished(out_dir, level, model, log) or train_expert(
            model, level, cache, out_dir, total, settings, objective_options=options,
            **_teacher_arguments(level, teacher, teacher_arch), **run,
        )  # fmt: skip
        if summaries[level]["status"] == "stopped":
            break
    if ctx.is_main:
        _write_outputs(out_dir, summaries, config, cache)
    return summaries


def _model_for(config: ModelConfig, model: nn.Module | None) -> nn.Module:
    """`model` (checked against `config`), or a new SamoraModel of `config`."""
    from samora.model import SamoraModel

    if model is None:
        return SamoraModel(config)
    if model.config.to_dict() != config.to_dict():
        raise ValueError("`model` was built from a different config than `model_config`")
    return model


def _teacher_arguments(level: str, teacher: str | Path | nn.Module | None, arch: str) -> dict[str, Any]:
    """train_expert's teacher and metadata: the distillation teacher is for the image level only."""
    if level != "image" or teacher is None:
        return {"teacher": None, "metadata": {}}
    return {"teacher": _resolve_teacher(teacher, arch), "metadata": {"teacher": _teacher_info(teacher)}}


def _caches(studies: Any, heldout: Any, out_dir: Path, config: ModelConfig, window: Any, progress: bool):
    """(training cache, held-out cache or None); rank 0 builds them, the other ranks then open them."""
    with main_first(context()):
        cache = _resolve_cache(studies, out_dir / "cache", config, window, progress)
        heldout_cache = None
        if heldout is not None:
            heldout_cache = _resolve_cache(heldout, out_dir / "heldout_cache", config, window, False)
    if heldout_cache is not None and heldout_cache.data_hash == cache.data_hash:
        raise ValueError("the held-out studies are the training studies; hold out studies that SSL does not see")
    return cache, heldout_cache


def _skip_finished(out_dir: Path, level: str, model: nn.Module, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The summary of an already trained `level` (its expert loaded into `model`); None when it must be trained."""
    weights_file, meta_file = expert_paths(out_dir, level)
    done = _finished_expert(out_dir, level, model)
    if done is None:
        return None
    load_experts(model, out_dir, [level])
    log(
        f"[{level}] expert already trained ({done.get('steps')} steps, final loss {done.get('final_loss')}); "
        f"skipping. Delete {meta_file} to retrain."
    )
    return {
        "level": level,
        "status": "skipped",
        "steps": done.get("steps"),
        "final_loss": done.get("final_loss"),
        "expert_file": str(weights_file),
    }


def _write_outputs(out_dir: Path, summaries: dict[str, dict[str, Any]], config: ModelConfig, cache: Any) -> None:
    """The loss-curve plot of every level with a log, and pretrain_summary.json."""
    logs = {level: log_path(out_dir, level) for level in EXPERTS if log_path(out_dir, level).exists()}
    if logs:
        plot_loss_curves(logs, out_dir / PLOT_FILE)
    summary = {
        "levels": summaries,
        "model_config": config.to_dict(),
        "samora_version": samora.__version__,
        "data_hash": cache.data_hash,
        "study_ids": cache.study_ids,
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary)


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


def _resolve_teacher(teacher: str | Path | nn.Module, arch: str) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    return load_teacher(teacher, arch)


def _teacher_info(teacher: str | Path | nn.Module) -> dict[str, Any]:
    from samora.io_utils import sha256_file

    if isinstance(teacher, nn.Module):
        return {"source": type(teacher).__name__}
    return {"source": str(teacher), "sha256": sha256_file(teacher)}
