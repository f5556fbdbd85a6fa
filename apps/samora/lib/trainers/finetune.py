"""`samora` trainer: stage-2 fine-tuning on the datastore's final labels; publishes a new model version."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.trainers.processes import REQUEST_DEFAULTS, jobs_root, request_plan
from lib.trainers.stats import StatsFile
from samora.distributed.jobs import run_finetune_job
from samora.engine.train import FinetuneConfig, finetune, load_labeled_cases
from samora.serving.labels import remap_by_name
from samora.serving.runtime import ModelRuntime
from samora.serving.validation import bool_param, positive_float_param, positive_int_param
from samora.ssl.experts_io import load_experts

log = logging.getLogger(__name__)


def labeled_cases(datastore: Datastore) -> tuple[list[tuple[str, str, str]], dict[str, list | None]]:
    """(case_id, image path, label path) for every final label, and each label's viewer label_info."""
    cases, infos = [], {}
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        if not label_id:
            continue
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL) or {}
        cases.append(
            (image_id, datastore.get_image_uri(image_id), datastore.get_label_uri(label_id, DefaultLabelTag.FINAL))
        )
        infos[image_id] = info.get("label_info") or (info.get("params") or {}).get("label_info")
    return cases, infos


class SamoraFinetuneTrainer(TrainTask):
    """Refreshes HL-Attn + decoders (+ experts on a random backbone) and the prompt path, then publishes."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__("SAMora stage-2 fine-tuning (HL-Attn + decoders + prompt path) on final labels")
        self.runtime = runtime
        self.stats_file = StatsFile(runtime.store.root / "train_stats_samora.json")

    def config(self) -> dict:
        s = self.runtime.settings
        return {
            "epochs": s.resolved_epochs(),
            "batch_size": s.batch_size,
            "lr": s.resolved_lr(),
            "prompt_training": True,
            **REQUEST_DEFAULTS,
        }

    def _starting_model(self):
        """(served version, a copy of it to train), or a fresh model when the conf changed since that version.
        In `full` mode the SSL experts on disk replace the version's (a bootstrap may have finished after it); in
        `cached` mode they cannot act (HL-Attn does not train) and would only force every slice to be re-encoded."""
        version, served = self.runtime.model()
        model = copy.deepcopy(served)  # never train the object a (sync) server is serving
        if model.config.to_dict() != self.runtime.settings.model_config().to_dict():
            # conf changed (labels, preset, size...) since that version: start from experts, not from it
            log.warning("model version %d was built with another configuration; training a fresh model", version)
            return version, self.runtime.fresh_model()
        store = self.runtime.store
        full = self.runtime.settings.resolved_train_mode() == "full"
        if version and full and not model.config.finetune_experts and store.expert_files():
            loaded = load_experts(model, store.experts_dir)
            log.info("training from model version %d with the SSL experts on disk: %s", version, loaded)
        return version, model

    def stats(self) -> dict:
        return self.stats_file.read()

    def __call__(self, request, datastore: Datastore) -> dict:
        defaults = self.config()
        params = {
            "epochs": positive_int_param(request, "epochs", defaults["epochs"]),
            "batch_size": positive_int_param(request, "batch_size", defaults["batch_size"]),
            "lr": positive_float_param(request, "lr", defaults["lr"]),
            "prompt_training": bool_param(request, "prompt_training", defaults["prompt_training"]),
        }
        plan = request_plan(request, self.runtime.settings)
        start = time.time()
        cases, infos = labeled_cases(datastore)
        if not cases:
            raise ValueError("no final labels in the datastore: save at least one label before training")
        labels = dict(self.runtime.settings.labels)
        version, model = self._starting_model()
        config = model.config
        train = load_labeled_cases(
            cases,
            config.image_size,
            config.context,
            label_map=lambda arr, case: remap_by_name(arr, infos[case], labels),
        )
        val = None
        # With few labels every study trains; from 4 on, the last one is held out for best-epoch selection.
        if len(cases) >= 4:
            held_out = cases[-1][0]
            keep = [i for i, c in enumerate(train.case_ids) if c != held_out]
            val = train.subset([i for i, c in enumerate(train.case_ids) if c == held_out])
            train = train.subset(keep)
        self.stats_file.write(
            {
                "status": "RUNNING",
                "epoch": 0,
                "total_epochs": params["epochs"],
                "best_metric": 0,
                "total_time": "0:00:00",
                "start_ts": start,
                "base_version": version,
            }
        )

        def on_epoch(record: dict) -> None:
            self.stats_file.write(
                {
                    "status": "RUNNING",
                    "epoch": record["epoch"],
                    "total_epochs": record["total_epochs"],
                    "best_metric": record["best_metric"],
                    "loss": record["loss"],
                    "val_dice": record["val_dice"],
                    "total_time": _hms(time.time() - start),
                    "start_ts": start,
                    "base_version": version,
                }
            )

        def on_encode(done: int, total: int) -> None:
            self.stats_file.write(
                {
                    "status": "RUNNING",
                    "epoch": 0,
                    "total_epochs": params["epochs"],
                    "best_metric": 0,
                    "stage": f"encoding slices {done}/{total} (once; then cached on disk)",
                    "total_time": _hms(time.time() - start),
                    "start_ts": start,
                    "base_version": version,
                }
            )
            log.info("encoded %d/%d training slices", done, total)

        mode = self.runtime.settings.resolved_train_mode()
        cached = mode == "cached"
        config = FinetuneConfig(
            epochs=params["epochs"],
            batch_size=params["batch_size"],
            lr=params["lr"],
            prompt_training=params["prompt_training"],
            device=self.runtime.settings.device,
            mode=mode,
            embedding_dir=str(self.runtime.store.root / "embeddings"),
            threads=max(1, (os.cpu_count() or 1) // plan.nproc) if cached else None,
            prompt_slices=2 if cached and self.runtime.settings.pretrained else None,
        )
        callbacks = {"on_epoch": on_epoch, "on_encode": on_encode}
        if plan.launches:
            root = jobs_root(self.runtime.store.root)
            model, result = run_finetune_job(root, plan, model, train, val, config, callbacks)
        else:
            result = finetune(model, train, config, val=val, **callbacks)
        data_hash = hashlib.sha256("".join(f"{c}:{i}:{lab}" for c, i, lab in cases).encode()).hexdigest()
        new_version = self.runtime.store.publish(
            model,
            metadata={
                "trained_on": [c for c, _, _ in cases],
                "data_hash": data_hash,
                "best_metric": result["best_metric"],
                "history": result["history"],
                "base_version": version,
                "train_mode": result["mode"],
            },
        )
        final = {
            "status": "DONE",
            "epoch": len(result["history"]),
            "total_epochs": params["epochs"],
            "best_metric": result["best_metric"],
            "total_time": _hms(time.time() - start),
            "start_ts": start,
            "model_version": new_version,
            "base_version": version,
            "labeled_studies": len(cases),
            "train_mode": result["mode"],
            "processes": plan.nproc,
        }
        self.stats_file.write(final)
        log.info("published model version %d (best dice %.4f)", new_version, result["best_metric"])
        return final


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
