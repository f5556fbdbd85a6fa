"""Foundation: backbone, experts, fusion, decoders, stages, persistence (tiny preset, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from model_helpers import make_everything_non_trivial, perturb_expert

from samora.adapters.experts import expert_parameters
from samora.backbones import PRESETS, CheckpointError
from samora.backbones.sam_vit import SamViTBackbone
from samora.config import EXPERTS, ConfigError, ModelConfig
from samora.model import ModelFileError, SamoraModel

LABELS = {"liver": 1, "spleen": 2, "kidney": 3}


def tiny(size: int = 128, **kw) -> SamoraModel:
    return SamoraModel(ModelConfig(preset="tiny", image_size=size, labels=LABELS, **kw))


@pytest.mark.parametrize("size", [128, 224, 256])
@pytest.mark.parametrize("decoder", ["samed", "hsam"])
def test_output_shapes(size, decoder):
    model = tiny(size, decoder=decoder).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        emb = model.encode(x)
        out = model.decode(emb)
        probs = model.probabilities(out)
        prompt = model.prompt(emb, boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0]] * 2))
    assert emb.shape == (2, 64, size // 16, size // 16)
    assert out["low_res_logits"].shape == (2, 4, size // 4, size // 4)
    assert out["logits"].shape == (2, 4, size, size)
    assert torch.allclose(probs.sum(1), torch.ones(2, size, size), atol=1e-5)
    assert prompt["low_res_logits"].shape == (2, 4, size // 4, size // 4)
    assert model.prompt_head.best_mask(prompt).shape == (2, 1, size, size)


def test_wrong_input_shape_is_named():
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 128, 128\)"):
        tiny().encode(torch.rand(1, 1, 128, 128))


def test_prompt_batch_must_match_image_batch():
    model = tiny().eval()
    emb = model.encode(torch.rand(2, 3, 128, 128))
    with pytest.raises(ValueError, match="batch"):
        model.prompt(emb, boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0]]))


@pytest.mark.parametrize("expert", EXPERTS)
def test_expert_is_noop_until_trained_then_changes_encoder(expert):
    model = tiny().eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        model.set_stage("inference")
        frozen = model.encode(x)
        model.set_stage(f"ssl-{expert}")
        untrained = model.encode(x)
        assert torch.equal(frozen, untrained)
        perturb_expert(model, expert)
        trained = model.encode(x)
        assert (trained - frozen).abs().max() > 1e-3
        # Other experts' routes are unaffected by this expert's weights.
        other = next(e for e in EXPERTS if e != expert)
        model.set_stage(f"ssl-{other}")
        assert torch.equal(model.encode(x), frozen)


def test_sum_fusion_uses_all_experts():
    model = tiny(fusion="sum").eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before = model.encode(x)
        perturb_expert(model, "pixel")
        assert (model.encode(x) - before).abs().max() > 1e-3


def test_hl_attn_fusion_starts_at_zero_and_learns():
    model = tiny(fusion="reduced").eval()
    x = torch.rand(1, 3, 128, 128)
    for e in EXPERTS:
        perturb_expert(model, e)
    with torch.no_grad():
        model.set_stage("inference")
        fused = model.encode(x)
        for site in model.backbone.attention_sites():
            site.mode = "off"
        frozen = model.encode(x)
    # Zero-initialised output projection: the fused correction is exactly zero before training.
    assert torch.equal(fused, frozen)
    with torch.no_grad():
        for site in model.backbone.attention_sites():
            torch.nn.init.normal_(site.fusion.up.weight, std=0.1)
            site.mode = "fusion"
        assert (model.encode(x) - frozen).abs().max() > 1e-4


def _attend_calls(model: SamoraModel, x: torch.Tensor) -> int:
    calls = []
    for site in model.backbone.attention_sites():
        inner = site.core.attend
        site.core.attend = lambda qkv, y, inner=inner: calls.append(1) or inner(qkv, y)
    model.encode(x)
    for site in model.backbone.attention_sites():
        del site.core.attend
    return len(calls)


def test_inference_skips_experts_that_add_exactly_zero():
    model = tiny(fusion="reduced").eval()
    sites = len(model.backbone.attention_sites())
    x = torch.rand(1, 3, 128, 128)
    for e in EXPERTS:
        perturb_expert(model, e)
    with torch.no_grad():
        assert all(site.idle() for site in model.backbone.attention_sites())  # HL-Attn output still zero
        assert _attend_calls(model, x) == sites  # the base attention only, not once per expert as well
        for site in model.backbone.attention_sites():
            torch.nn.init.normal_(site.fusion.up.weight, std=0.1)
        assert not any(site.idle() for site in model.backbone.attention_sites())
        assert _attend_calls(model, x) == sites * (1 + len(EXPERTS))
    # with gradients (training) the full routing runs whatever the weights, so every part gets its gradient
    model = tiny(fusion="sum").eval()
    assert all(site.idle() for site in model.backbone.attention_sites())  # untrained experts: LoRA B is zero
    assert _attend_calls(model, x) == sites * (1 + len(EXPERTS))
    perturb_expert(model, EXPERTS[0])
    assert not any(site.idle() for site in model.backbone.attention_sites())


def test_reduced_fusion_is_smaller_than_full():
    reduced = tiny(fusion="reduced").parameter_report()["components"]["fusion"]
    full = tiny(fusion="full").parameter_report()["components"]["fusion"]
    assert 0 < reduced < full


def _grad_names(model: SamoraModel, x: torch.Tensor) -> set[str]:
    model.zero_grad(set_to_none=True)
    if model.stage.startswith("ssl-"):
        loss = model.encode(x).pow(2).mean()
    else:
        emb = model.encode(x)
        loss = model.decode(emb)["logits"].pow(2).mean()
        loss = loss + model.prompt(emb, boxes=torch.tensor([[5.0, 5.0, 90.0, 90.0]]))["low_res_logits"].pow(2).mean()
    loss.backward()
    return {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("expert", EXPERTS)
def test_ssl_stage_trains_only_its_expert(expert):
    model = tiny()
    for e in EXPERTS:
        perturb_expert(model, e, 0.05)  # non-zero B so A receives gradient too
    model.set_stage(f"ssl-{expert}")
    names = _grad_names(model, torch.rand(1, 3, 128, 128))
    assert names, "no parameter received gradient"
    assert all(f".{expert}.weight" in n and "lora_" in n for n in names), sorted(names)[:5]
    expected = {f"backbone.encoder.{k}" for k in expert_parameters(model.backbone.encoder, expert)}
    assert set(names) == expected, "some expert weights got no grad"
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in expert_parameters(model.backbone.encoder, expert).values()
    }


def test_finetune_stage_trains_fusion_and_decoders_only():
    model = tiny(decoder="hsam")
    for e in EXPERTS:
        perturb_expert(model, e, 0.05)
    model.set_stage("finetune")
    for site in model.backbone.attention_sites():  # leave the zero start so gradient reaches the whole fusion
        torch.nn.init.normal_(site.fusion.up.weight, std=0.05)
    names = _grad_names(model, torch.rand(1, 3, 128, 128))
    assert not any("lora_" in n for n in names), "experts must stay frozen in stage 2"
    assert not any(n.startswith("backbone.encoder.") and ".fusion." not in n for n in names), "encoder must stay frozen"
    assert any(".fusion." in n for n in names)
    assert any(n.startswith("head.") for n in names)
    assert any(n.startswith("prompt_head.") for n in names)


def test_hsam_gate_receives_gradient():
    model = tiny(decoder="hsam")
    model.set_stage("finetune")
    out = model(torch.rand(2, 3, 128, 128))
    target = torch.randint(0, 4, (2, 128, 128))
    torch.nn.functional.cross_entropy(out["logits"], target).backward()
    gate = model.head.enhance.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.bias.grad.abs().sum() > 0


def test_save_load_reproduces_outputs_bit_for_bit(tmp_path):
    model = make_everything_non_trivial(tiny(decoder="hsam"))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)["logits"]
    model.save(tmp_path / "m", metadata={"version": 3})
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["model.json", "weights.safetensors"]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["version"] == 3 and meta["labels"] == LABELS and meta["stage"] == "finetune"
    # Only the small trainable parts are stored: far fewer values than the whole model.
    assert (tmp_path / "m" / "weights.safetensors").stat().st_size < 4 * sum(p.numel() for p in model.parameters())
    loaded = SamoraModel.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], expected)


def test_corrupt_weights_are_refused(tmp_path):
    model = tiny()
    model.save(tmp_path / "m")
    path = tmp_path / "m" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        SamoraModel.load(tmp_path / "m")


def _official_layout_state(backbone: SamViTBackbone) -> dict[str, torch.Tensor]:
    state = {f"image_encoder.{k}": v for k, v in backbone.encoder.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v for k, v in backbone.prompt_encoder.state_dict().items()})
    state.update({f"mask_decoder.{k}": v for k, v in backbone.mask_decoder.state_dict().items()})
    return state


def test_vit_b_checkpoint_at_1024_loads_at_512_and_224(tmp_path):
    torch.manual_seed(0)
    source = SamViTBackbone(PRESETS["vit_b"], 1024)
    ckpt = tmp_path / "random_vit_b_1024.pth"
    torch.save(_official_layout_state(source), ckpt)
    del source
    for size in (512, 224):
        model = SamoraModel(ModelConfig(preset="vit_b", image_size=size, checkpoint=str(ckpt), labels=LABELS))
        report = model.load_report
        assert report["missing"] == [] and report["unexpected"] == []
        assert any("mask_tokens" in part for part in report["reinitialised"])
        assert any("output_hypernetworks_mlps" in part for part in report["reinitialised"])
        encoder = model.backbone.encoder
        grid = size // 16
        assert tuple(encoder.pos_embed.shape) == (1, grid, grid, 768)
        for i, block in enumerate(encoder.blocks):
            rows = 2 * grid - 1 if i in PRESETS["vit_b"].global_attn_indexes else 27
            assert block.attn.core.rel_pos_h.shape[0] == rows, (i, block.attn.core.rel_pos_h.shape)
        del model


def test_missing_checkpoint_error_is_actionable(tmp_path):
    with pytest.raises(CheckpointError) as err:
        SamoraModel(ModelConfig(preset="vit_b", image_size=256, checkpoint=str(tmp_path / "sam_vit_b_01ec64.pth")))
    message = str(err.value)
    assert str(tmp_path / "sam_vit_b_01ec64.pth") in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert PRESETS["vit_b"].checkpoint.sha256 in message


def test_official_filename_with_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(CheckpointError, match="sha256"):
        SamoraModel(ModelConfig(preset="vit_b", image_size=256, checkpoint=str(fake)))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=100)
    with pytest.raises(ConfigError, match="fusion"):
        ModelConfig(fusion="concat")
    with pytest.raises(ConfigError, match="labels"):
        ModelConfig(labels={"a": 1, "b": 1})


def test_model_info_cli_vit_b():
    result = subprocess.run(
        [sys.executable, "-m", "samora.cli", "model-info", "--preset", "vit_b", "--image-size", "512", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    for e in EXPERTS:
        assert report["components"][f"expert_{e}"] == 147_456  # 12 blocks x (Q, V) x rank 4 x (768 + 768)
    assert report["stages"]["ssl-image"]["trainable"] == 147_456
    full = subprocess.run(
        [
            sys.executable,
            "-m",
            "samora.cli",
            "model-info",
            "--preset",
            "vit_b",
            "--image-size",
            "512",
            "--json",
            "--fusion",
            "full",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert report["components"]["fusion"] < json.loads(full.stdout)["components"]["fusion"]


def test_the_dense_positional_encoding_is_computed_once_and_follows_its_buffer():
    from samora.decoders.two_way import dense_pe

    prompt_encoder = tiny().backbone.prompt_encoder
    first = dense_pe(prompt_encoder)
    torch.testing.assert_close(first, prompt_encoder.get_dense_pe())
    assert dense_pe(prompt_encoder) is first  # cached: no recomputation per decoded slice
    assert not any("dense_pe" in k for k in prompt_encoder.state_dict())
    with torch.no_grad():  # a loaded checkpoint overwrites the buffer in place: the cache must notice
        prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2)
    again = dense_pe(prompt_encoder)
    assert again is not first
    torch.testing.assert_close(again, prompt_encoder.get_dense_pe())
