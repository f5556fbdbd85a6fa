"""The Segmenter protocol: SamoraModel and the bench's UNet baseline both implement what training and volume
inference use, and the baseline goes through the same finetune and segment_volume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from samora.config import ModelConfig
from samora.data import Volume
from samora.engine.inference import segment_volume
from samora.engine.segmenter import Segmenter
from samora.engine.train import FinetuneConfig, LabeledSlices, finetune
from samora.model import SamoraModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baselines import UNetModel  # noqa: E402

SIZE = 64


def test_samora_model_and_unet_baseline_are_segmenters():
    assert isinstance(SamoraModel(ModelConfig(preset="tiny", image_size=SIZE, labels={"organ": 1})), Segmenter)
    unet = UNetModel({"organ": 1}, SIZE, seed=0)
    assert isinstance(unet, Segmenter)
    assert unet.config.num_classes == 2 and unet.backbone.pretrained is False and unet.prompt_head is None


def test_unet_baseline_trains_and_segments_through_the_samora_paths():
    rng = np.random.default_rng(0)
    labels = np.zeros((4, SIZE, SIZE), np.uint8)
    labels[:, 20:40, 20:40] = 1
    images = np.repeat(labels[:, None].astype(np.float16), 3, axis=1) * 0.8 + 0.1
    model = UNetModel({"organ": 1}, SIZE, seed=0)
    result = finetune(model, LabeledSlices(images, labels, ["a"] * 4), FinetuneConfig(epochs=1, batch_size=2))
    assert result["steps"] == 2 and result["history"][0]["dice_on"] == "training"
    volume = Volume(rng.random((SIZE, SIZE, 3)).astype(np.float32) * 400, np.eye(4), "mem.nii.gz", "CT")
    seg = segment_volume(model, volume)
    assert seg.labels.shape == (SIZE, SIZE, 3)
