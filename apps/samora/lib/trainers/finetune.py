"""`samora` trainer: stage-2 fine-tuning on the datastore's final labels; publishes a new model version."""

from __future__ import annotations

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.trainers.processes import REQUEST_DEFAULTS, jobs_root, request_plan
from lib.trainers.stats import StatsFile
from samora.serving.finetuning import FinetuneRequest, finetune_and_publish, starting_model
from samora.serving.runtime import ModelRuntime
from samora.serving.validation import bool_param, positive_float_param, positive_int_param


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

    def stats(self) -> dict:
        return self.stats_file.read()

    def __call__(self, request, datastore: Datastore) -> dict:
        defaults = self.config()
        wanted = FinetuneRequest(
            epochs=positive_int_param(request, "epochs", defaults["epochs"]),
            batch_size=positive_int_param(request, "batch_size", defaults["batch_size"]),
            lr=positive_float_param(request, "lr", defaults["lr"]),
            prompt_training=bool_param(request, "prompt_training", defaults["prompt_training"]),
        )
        plan = request_plan(request, self.runtime.settings)
        cases, infos = labeled_cases(datastore)
        if not cases:
            raise ValueError("no final labels in the datastore: save at least one label before training")
        version, model = starting_model(self.runtime)
        root = jobs_root(self.runtime.store.root)
        return finetune_and_publish(
            self.runtime, model, version, cases, infos, wanted, plan, root, write_stats=self.stats_file.write
        )
