"""App settings, label remapping and the versioned model store (no server needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samora.config import ModelConfig
from samora.engine.store import ModelStore
from samora.model import SamoraModel
from samora.serving.labels import LabelMappingError, remap_by_name
from samora.serving.settings import AppSettings, SettingsError, parse_labels


def test_settings_from_string_conf():
    s = AppSettings.from_conf(
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": "liver=1,spleen=2",
            "epochs": "3",
            "lr": "0.01",
            "unrelated_monailabel_key": "x",
            "propagation_stability": "0.6",
            "click_spread_confidence": "0.9",
        }
    )
    assert s.image_size == 64 and s.epochs == 3 and s.lr == 0.01 and s.propagation_stability == 0.6
    assert s.click_spread_confidence == 0.9
    assert s.labels == {"liver": 1, "spleen": 2}
    assert s.model_config().finetune_experts is True  # no checkpoint: random backbone needs its LoRAs trained
    assert parse_labels('{"a": 2, "b": 1}') == {"a": 2, "b": 1}


@pytest.mark.parametrize(
    ("conf", "key"),
    [
        ({"image_size": "100"}, "image_size"),
        ({"epochs": "many"}, "epochs"),
        ({"labels": "liver"}, "labels"),
        ({"bootstrap": "sometimes"}, "bootstrap"),
        ({"checkpoint": "/nope/sam.pth"}, "checkpoint"),
        ({"preset": "vit_z"}, "preset"),
        ({"labels": '{"a": 1, "b": 1}'}, "labels"),
        ({"propagation_stability": "1.5"}, "propagation_stability"),
        ({"click_spread_confidence": "-0.1"}, "click_spread_confidence"),
        ({"train_mode": "fast"}, "train_mode"),
        ({"ct_window": "40"}, "ct_window"),
        ({"epochs": "-1"}, "epochs"),
        ({"image_size": "512"}, "image_size"),  # litemedsam takes 256 only
    ],
)
def test_bad_conf_names_the_key(conf, key):
    with pytest.raises(SettingsError, match=key):
        AppSettings.from_conf(conf)


def test_defaults_serve_litemedsam_with_a_training_mode_per_device():
    s = AppSettings.from_conf({})
    assert s.preset == "litemedsam" and s.image_size == 256 and s.pretrained
    assert s.model_config().finetune_experts is False  # real weights: the experts come from SSL, not stage 2
    assert s.resolved_train_mode() == "cached" and s.resolved_epochs() == 6
    assert s.resolved_lr() == 1e-3 and AppSettings.from_conf({"preset": "tiny"}).resolved_lr() == 3e-3
    assert AppSettings.from_conf({"lr": "2e-4"}).resolved_lr() == 2e-4
    assert AppSettings.from_conf({}).embedding_cache_gb == 4.0
    gpu = AppSettings.from_conf({"device": "cuda"})
    assert gpu.resolved_train_mode() == "full" and gpu.resolved_epochs() == 40
    assert AppSettings.from_conf({"train_mode": "full", "epochs": "3"}).resolved_epochs() == 3
    assert AppSettings.from_conf({"ct_window": "50,350"}).window().low == -125.0
    assert AppSettings.from_conf({"preset": "tiny"}).image_size == 128


def test_fusion_and_ssl_recipe_follow_the_training_mode():
    cpu, gpu = AppSettings.from_conf({}), AppSettings.from_conf({"device": "cuda"})
    # cached: the frozen experts act through their plain sum; HL-Attn would keep them at zero there
    assert cpu.resolved_fusion() == "sum" and cpu.model_config().fusion == "sum" and cpu.experts_act()
    assert cpu.resolved_ssl() == (20, 4)
    assert gpu.resolved_fusion() == "reduced" and gpu.experts_act() and gpu.resolved_ssl() == (150, 8)
    gated = AppSettings.from_conf({"fusion": "reduced"})
    assert gated.resolved_fusion() == "reduced" and not gated.experts_act()
    assert AppSettings.from_conf({"fusion": "patch"}).experts_act()
    assert AppSettings.from_conf({"ssl_steps": "7"}).resolved_ssl() == (7, 4)
    with pytest.raises(SettingsError, match="ssl_steps"):
        AppSettings.from_conf({"ssl_batch_size": "-1"})


def test_tasks_pause_during_requests_on_a_cpu_unless_told_otherwise():
    with pytest.raises(SettingsError, match="pause_tasks"):
        AppSettings.from_conf({"pause_tasks": "yes"})
    assert AppSettings.from_conf({}).pauses_tasks()
    assert not AppSettings.from_conf({"device": "cuda"}).pauses_tasks()
    assert AppSettings.from_conf({"device": "cuda", "pause_tasks": "on"}).pauses_tasks()
    assert not AppSettings.from_conf({"pause_tasks": "off"}).pauses_tasks()


def test_training_precision_is_bf16_only_through_the_encoder_and_where_native(monkeypatch):
    import samora.serving.settings as settings_module

    with pytest.raises(SettingsError, match="train_precision"):
        AppSettings.from_conf({"train_precision": "fp16"})
    assert AppSettings.from_conf({}).resolved_precision(through_encoder=True) == "fp32"  # opt-in
    forced = AppSettings.from_conf({"train_precision": "bf16"})
    assert forced.resolved_precision(through_encoder=True) == "bf16"
    assert forced.resolved_precision(through_encoder=False) == "fp32"  # cached-mode heads gain nothing
    auto = AppSettings.from_conf({"train_precision": "auto"})
    monkeypatch.setattr(settings_module, "supports_bf16", lambda device: False)
    assert auto.resolved_precision(through_encoder=True) == "fp32"  # never emulated bf16
    monkeypatch.setattr(settings_module, "supports_bf16", lambda device: True)
    assert auto.resolved_precision(through_encoder=True) == "bf16"


def test_remap_by_name_follows_viewer_order():
    viewer = np.array([[1, 2], [3, 0]])
    info = [{"name": "Spleen", "idx": 1}, {"name": "liver", "idx": 2}, {"name": "tumour", "idx": 3}]
    out = remap_by_name(viewer, info, {"liver": 1, "spleen": 2})
    assert out.tolist() == [[2, 1], [0, 0]]


def test_remap_without_info_rejects_unknown_values():
    with pytest.raises(LabelMappingError, match=r"\[7\]"):
        remap_by_name(np.array([0, 1, 7]), None, {"liver": 1})


def test_store_publishes_versions_and_falls_back_past_corruption(tmp_path):
    store = ModelStore(tmp_path / "models", keep=3)
    assert store.load_current() is None
    model = SamoraModel(ModelConfig(preset="tiny", image_size=64, labels={"liver": 1}))
    v1 = store.publish(model, {"note": "first"})
    with torch.no_grad():
        model.head.decoder.mask_tokens.weight.add_(1.0)
    v2 = store.publish(model)
    assert (v1, v2) == (1, 2) and store.current_version() == 2
    assert json.loads((store.path(2) / "model.json").read_text())["version"] == 2
    # corrupt v2: the store reports it and serves v1
    weights = store.path(2) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    version, loaded = store.load_current()
    assert version == 1
    assert not torch.equal(loaded.head.decoder.mask_tokens.weight, model.head.decoder.mask_tokens.weight)
    for _ in range(3):
        store.publish(model)
    assert store.versions() == [3, 4, 5]  # keeps the newest `keep`
    store.rollback(4)
    assert store.current_version() == 4


def test_model_output_is_renumbered_by_name_onto_the_served_map():
    from samora.serving.labels import remap_model_output

    out = np.array([0, 1, 2, 3, 3])
    trained = {"liver": 1, "spleen": 2, "gallbladder": 3}
    same, dropped = remap_model_output(out, trained, dict(trained))
    assert same is out and dropped == []
    renumbered, dropped = remap_model_output(out, trained, {"Spleen": 1, "liver": 4})
    assert renumbered.tolist() == [0, 4, 1, 0, 0] and dropped == ["gallbladder"]
