"""bf16 autocast training (stage 2 and the SSL experts): the forward runs in bf16, weights and losses stay fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_helpers import perturb_expert

from samora.config import EXPERTS, ModelConfig, SSLSettings
from samora.data import SliceCache, discover_studies
from samora.engine.precision import training_autocast
from samora.engine.train import FinetuneConfig, LabeledSlices, finetune
from samora.model import SamoraModel
from samora.ssl import train_expert
from samora.ssl.trainer import SILENT, log_path

SIZE = 64


def tiny_model() -> SamoraModel:
    model = SamoraModel(ModelConfig(preset="tiny", image_size=SIZE, labels={"organ": 1}))
    for name in EXPERTS:
        perturb_expert(model, name, 0.05)
    return model


def encoder_output_dtypes(model: SamoraModel) -> tuple[list[torch.dtype], torch.utils.hooks.RemovableHandle]:
    """Record the dtype of the first encoder Linear's output at every forward call."""
    linear = next(m for m in model.backbone.encoder.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    handle = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen, handle


def labelled_slices(n: int = 4) -> LabeledSlices:
    rng = np.random.default_rng(0)
    labels = np.zeros((n, SIZE, SIZE), np.uint8)
    labels[:, 20:40, 24:44] = 1
    images = (0.3 * rng.random((n, 3, SIZE, SIZE)) + 0.5 * labels[:, None]).astype(np.float16)
    return LabeledSlices(images, labels, ["synthetic"] * n)


def test_unknown_precisions_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match="'fp16'.*'fp32', 'bf16'"):
        FinetuneConfig(precision="fp16")
    with pytest.raises(ValueError, match="'half'.*'fp32', 'bf16'"):
        SSLSettings(precision="half")
    with pytest.raises(ValueError, match="'int8'"):
        training_autocast("int8", "cpu")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_full_stage_finetune_runs_its_forward_in_the_asked_precision(precision, dtype):
    model = tiny_model()
    seen, handle = encoder_output_dtypes(model)
    fusion_before = {k: v.clone() for k, v in model.state_dict().items() if ".fusion." in k}
    config = FinetuneConfig(epochs=1, batch_size=2, max_steps=2, augment=False, mode="full", precision=precision)
    try:
        history = finetune(model, labelled_slices(), config)
    finally:
        handle.remove()
    assert history["steps"] == 2 and np.isfinite(history["history"][0]["loss"])
    assert seen and set(seen) == {dtype}  # training steps and the best-epoch check alike
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in fusion_before.items()), "HL-Attn did not train"


def test_bf16_training_learns_the_slices_about_as_well_as_fp32():
    """bf16 autocast changes rounding, not what is learned: after the same steps the training Dice is close."""
    scores = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        config = FinetuneConfig(epochs=12, batch_size=2, lr=3e-3, augment=False, mode="full", precision=precision)
        scores[precision] = finetune(tiny_model(), labelled_slices(), config)["best_metric"]
    assert scores["fp32"] > 0.5, scores  # the task is learnable at all in these steps
    assert abs(scores["bf16"] - scores["fp32"]) < 0.1, scores


@pytest.mark.parametrize("level", ["image", "pixel"])
def test_an_ssl_expert_trains_under_bf16_autocast_with_fp32_weights(shared_data, tmp_path, level):
    cache = SliceCache.build(discover_studies(shared_data / "ct_3slice_dcmqi"), tmp_path / "cache", SIZE,
                             progress=False)  # fmt: skip
    model = tiny_model()
    seen, handle = encoder_output_dtypes(model)
    settings = SSLSettings(batch_size=2, lr=1e-3, precision="bf16")
    try:
        summary = train_expert(model, level, cache, tmp_path / "experts", 3, settings, hooks=SILENT)
    finally:
        handle.remove()
    losses = [json.loads(line)["loss"] for line in log_path(tmp_path / "experts", level).read_text().splitlines()]
    assert summary["status"] == "finished" and len(losses) == 3 and np.isfinite(losses).all()
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
