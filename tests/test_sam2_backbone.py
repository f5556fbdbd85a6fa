"""SAM2 Hiera backbone family (sam2_tiny preset, CPU): shapes, experts, fusion, SSL, stage 2, persistence, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import MemoryCache, make_everything_non_trivial, perturb_expert

from samora.adapters.experts import expert_parameters
from samora.backbones import PRESETS, CheckpointError, Sam2HieraBackbone, build_backbone
from samora.config import EXPERTS, ConfigError, ModelConfig
from samora.engine.train import FinetuneConfig, LabeledSlices, finetune
from samora.model import SamoraModel
from samora.ssl import MaskedPixelObjective, build_objective, train_expert
from samora.ssl.objectives import normalise_patches, patchify
from samora.ssl.trainer import SILENT, SSLSettings

LABELS = {"liver": 1, "spleen": 2}
SIZE = 64


def sam2_tiny(size: int = SIZE, **kw) -> SamoraModel:
    return SamoraModel(ModelConfig(preset="sam2_tiny", image_size=size, labels=LABELS, **kw))


def blobs(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic slices (n, 3, S, S) in [0, 1] with one bright disc each, and its label (class 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, labels = [], []
    for _ in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < rng.uniform(0.02, 0.06)
        images.append(np.repeat((0.1 * xx + 0.7 * disc)[None], 3, axis=0).astype(np.float32))
        labels.append(disc.astype(np.uint8))
    return np.stack(images), np.stack(labels)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these small CPU steps gain nothing from more on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- backbone ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_embedding_and_high_res_shapes(size):
    model = sam2_tiny(size).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = model.backbone.encode(x)
        logits = model(x)["logits"]
    assert out.embedding.shape == (2, 64, size // 16, size // 16)
    assert [tuple(h.shape) for h in out.high_res] == [(2, 64, size // 4, size // 4), (2, 64, size // 8, size // 8)]
    assert logits.shape == (2, 3, size, size)


def test_every_hiera_block_is_adapted_at_its_output_width():
    backbone = sam2_tiny().backbone
    blocks = backbone.encoder.trunk.blocks
    sites = backbone.attention_sites()
    assert len(sites) == len(blocks) == sum(PRESETS["sam2_tiny"].stages)
    assert [s.core.width for s in sites] == [b.dim_out for b in blocks] == [32, 64, 128, 128, 256]
    # q-pooling blocks (stage changes) fuse at dim_out, with their fusion module sized for it.
    assert [s.core.q_pool is not None for s in sites] == [False, True, True, False, True]
    assert [s.fusion.up.out_features for s in sites] == [32, 64, 128, 128, 256]


def test_hsam_head_runs_on_the_hiera_embedding():
    model = sam2_tiny(decoder="hsam").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, SIZE, SIZE))
    assert out["logits"].shape == (1, 3, SIZE, SIZE)
    assert torch.isfinite(model.probabilities(out)).all()


@pytest.mark.parametrize("expert", EXPERTS)
def test_expert_is_noop_until_trained_then_changes_encoder(expert):
    model = sam2_tiny().eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        model.set_stage("inference")
        frozen = model.encode(x)
        model.set_stage(f"ssl-{expert}")
        assert torch.equal(model.encode(x), frozen)
        perturb_expert(model, expert)
        assert (model.encode(x) - frozen).abs().max() > 1e-3
        other = next(e for e in EXPERTS if e != expert)
        model.set_stage(f"ssl-{other}")
        assert torch.equal(model.encode(x), frozen)


def test_fusion_starts_exactly_at_the_frozen_output():
    model = sam2_tiny().eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    for e in EXPERTS:
        perturb_expert(model, e)
    with torch.no_grad():
        fused = model.encode(x)
        for site in model.backbone.attention_sites():
            site.mode = "off"
        frozen = model.encode(x)
        assert torch.equal(fused, frozen)
        for site in model.backbone.attention_sites():
            torch.nn.init.normal_(site.fusion.up.weight, std=0.1)
            site.mode = "fusion"
        assert (model.encode(x) - frozen).abs().max() > 1e-4


# ----- stage 1 ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_experts(tmp_path_factory):
    """A few train_expert steps per level on one model, with the state before and after each level."""
    model = sam2_tiny()
    cache = MemoryCache(blobs(8, SIZE)[0])
    out = tmp_path_factory.mktemp("sam2_experts")
    results = {}
    for level in EXPERTS:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        summary = train_expert(model, level, cache, out, 4, SSLSettings(batch_size=4, lr=1e-3), hooks=SILENT)
        after = {k: v.clone() for k, v in model.state_dict().items()}
        results[level] = {"summary": summary, "before": before, "after": after}
    return model, results


@pytest.mark.parametrize("level", EXPERTS)
def test_train_expert_changes_only_its_expert(trained_experts, level):
    model, results = trained_experts
    before, after = results[level]["before"], results[level]["after"]
    own = {"backbone.encoder." + k for k in expert_parameters(model.backbone.encoder, level)}
    assert own and set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= own, sorted(changed - own)[:5]
    assert all(after[k].abs().sum() > 0 for k in own if ".lora_B." in k)
    assert np.isfinite(results[level]["summary"]["final_loss"])


def test_patch_objective_masks_pixels_and_scores_masked_patches_only():
    model = sam2_tiny().eval()
    model.set_stage("ssl-patch")
    objective = build_objective("patch", model)
    assert isinstance(objective, MaskedPixelObjective)
    seen = []
    encode = model.encode
    model.encode = lambda x: seen.append(x) or encode(x)
    images = torch.from_numpy(blobs(2, SIZE)[0]) + 0.05
    with torch.no_grad():
        loss = objective(model, (images,), torch.Generator().manual_seed(0))["loss"]
    masked_input = patchify(seen[0])
    filled = (masked_input == 0).all(dim=-1)  # the fill starts at 0; the images are >= 0.05 everywhere
    assert filled.float().mean().item() == pytest.approx(objective.mask_ratio, abs=0.07)
    untouched = patchify(images)
    assert torch.equal(masked_input[~filled], untouched[~filled])
    # The decoder's output layer starts at zero, so the loss is the mean squared target over the masked patches.
    target = normalise_patches(untouched, objective.norm_eps).pow(2).mean(dim=-1)
    assert torch.allclose(loss, target[filled].mean())


# ----- stage 2 and persistence ------------------------------------------------------------------------------------


def test_stage2_steps_train_only_fusion_and_decoders():
    model = sam2_tiny(decoder="hsam")
    for e in EXPERTS:
        perturb_expert(model, e, 0.05)
    images, labels = blobs(6, SIZE, seed=1)
    data = LabeledSlices(images.astype(np.float16), labels, ["synthetic"] * 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = finetune(model, data, FinetuneConfig(epochs=1, batch_size=2, max_steps=3, augment=False, lr=1e-3))
    after = model.state_dict()
    assert history["steps"] == 3 and np.isfinite(history["history"][0]["loss"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = ("head.", "prompt_head.", "backbone.prompt_encoder.")
    assert all(".fusion." in k or k.startswith(trainable) for k in changed), sorted(changed)[:5]
    assert any(".fusion." in k for k in changed) and any(k.startswith("head.") for k in changed)


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_everything_non_trivial(sam2_tiny(decoder="hsam"))
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)["logits"]
    model.save(tmp_path / "m")
    loaded = SamoraModel.load(tmp_path / "m").eval()
    assert loaded.backbone.family == "sam2"
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], expected)


# ----- checkpoints and sizes --------------------------------------------------------------------------------------


def test_missing_official_checkpoint_error_is_actionable(tmp_path):
    path = tmp_path / "sam2_hiera_tiny.pt"
    with pytest.raises(CheckpointError) as err:
        SamoraModel(ModelConfig(preset="hiera_t", image_size=256, checkpoint=str(path)))
    message = str(err.value)
    assert str(path) in message
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_tiny.pt" in message
    assert "SAMORA_WEIGHTS_DIR" in message


def test_sam2_checkpoint_loads_encoder_at_other_sizes_and_reports_random_heads(tmp_path):
    torch.manual_seed(5)
    source = Sam2HieraBackbone(PRESETS["sam2_tiny"], 64)
    with torch.no_grad():
        source.encoder.trunk.pos_embed.normal_(std=0.5)  # non-zero, so a failed load or resize would show
    state = {f"image_encoder.{k}": v for k, v in source.encoder.state_dict().items()}
    state["sam_mask_decoder.obj_score_token.weight"] = torch.zeros(1, 64)  # SAM2-only parts are ignored
    ckpt = tmp_path / "sam2_tiny_random.pt"
    torch.save({"model": state}, ckpt)
    for size in (64, 128):
        model = SamoraModel(
            ModelConfig(preset="sam2_tiny", image_size=size, checkpoint=str(ckpt), labels=LABELS, init_seed=3)
        )
        report = model.load_report
        assert report["missing"] == [] and report["unexpected"] == []
        assert any(part.startswith("mask_decoder") for part in report["reinitialised"])
        assert torch.equal(model.backbone.encoder.trunk.pos_embed, source.encoder.trunk.pos_embed)
        with torch.no_grad():
            assert torch.isfinite(model.encode(torch.rand(1, 3, size, size))).all()


def test_official_config_matches_sam2_and_adapted_attention_reproduces_it(tmp_path):
    """hiera_t against sam2's own build from configs/sam2/sam2_hiera_t.yaml: same keys, same encoder output."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    reference = build_sam2("configs/sam2/sam2_hiera_t.yaml", ckpt_path=None, device="cpu").eval()
    ckpt = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": reference.state_dict()}, ckpt)
    backbone = build_backbone("hiera_t", 128, ckpt).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ours, theirs = backbone.encode(x), reference.image_encoder(x)
    assert torch.allclose(ours.embedding, theirs["vision_features"], atol=1e-5)
    for mine, ref in zip(ours.high_res, theirs["backbone_fpn"][:2], strict=True):
        assert torch.allclose(mine, ref, atol=1e-5)


def test_image_size_must_be_divisible_by_32():
    with pytest.raises(ConfigError, match="divisible by 32"):
        ModelConfig(preset="sam2_tiny", image_size=80, labels=LABELS)
    with pytest.raises(ValueError, match="divisible by 32"):
        Sam2HieraBackbone(PRESETS["sam2_tiny"], 80)
    ModelConfig(preset="tiny", image_size=80, labels=LABELS)  # the ViT family keeps its multiple of 16
