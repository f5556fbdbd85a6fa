"""The MONAI Label app in-process (fastapi TestClient): the same flow as the e2e test, for fast iteration."""

from __future__ import annotations

import json

import pytest
from app_helpers import shuffled_slicer_label


def _infer(client, model, image, params=None):
    r = client.post(f"/infer/{model}?image={image}&output=all", data={"params": json.dumps(params or {})})
    assert r.status_code == 200, r.text
    return r


def test_info_lists_tasks(client):
    info = client.get("/info/").json()
    assert set(info["models"]) == {"samora", "samora_prompt"}
    assert info["models"]["samora"]["type"] == "segmentation"
    assert info["models"]["samora_prompt"]["type"] == "deepgrow"
    for name in ("samora", "samora_prompt"):  # the encoder path, here forced by the tests' conf (not probed)
        assert info["models"][name]["encoder_path"] | {"rows": []} == {
            "chosen": "fp32",
            "forced": True,
            "device": "cpu",
            "rows": [],
            "measured": None,
            "reused": False,
        }
    assert list(info["trainers"]) == ["samora", "samora_ssl"]
    assert "samora_uncertainty" in info["scoring"]
    assert {"uncertainty", "random", "first"} <= set(info["strategies"])
    assert info["labels"] == ["liver", "spleen", "kidney_left", "kidney_right", "spine"]


def test_train_publishes_version_and_infer_uses_it(client, tmp_path):
    unlabeled = client.store["unlabeled"][0]
    # before any training the class heads are untrained: 409 with what to do, and /info says so
    before = client.post(f"/infer/samora?image={unlabeled}&output=all", data={"params": "{}"})
    assert before.status_code == 409, before.text
    detail = before.json()["detail"]
    assert "no trained model version" in detail and "save final labels" in detail.lower()
    info = client.get("/info/").json()
    assert info["models"]["samora"]["status"].startswith("untrained")
    assert info["models"]["samora"]["model"] == {"trained": False}
    assert info["models"]["samora_prompt"]["status"] == "random-initialised prompt path"  # the tiny test preset
    # save a final label with Slicer-style label_info in a shuffled order
    target = client.store["unlabeled"][1]
    order = ["spine", "kidney_right", "liver", "spleen", "kidney_left"]
    label_file = tmp_path / "upload.nii.gz"
    label_info = shuffled_slicer_label(client.store["truth"] / f"{target}.nii.gz", label_file, order)
    with open(label_file, "rb") as f:
        r = client.put(
            f"/datastore/label?image={target}&tag=final",
            files={"label": ("l.nii.gz", f)},
            data={"params": json.dumps({"label_info": label_info})},
        )
    assert r.status_code == 200, r.text
    r = client.post("/train/samora?run_sync=true", json={"epochs": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == 1
    stats = client.get("/info/").json()["train_stats"]["samora"]
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2 and "best_metric" in stats
    after = _infer(client, "samora", unlabeled)
    assert after.status_code == 200 and after.content
    models = client.get("/info/").json()["models"]
    assert models["samora"]["status"] == "model version 1"
    for task in ("samora", "samora_prompt"):
        summary = models[task]["model"]
        assert summary["trained"] and summary["version"] == 1 and summary["labeled_studies"] == 3, summary
        assert summary["train_mode"] == "cached" and summary["published_at"].startswith("20"), summary


def test_prompt_reuses_embeddings(client):
    image = client.store["unlabeled"][0]
    params = {"label": "liver", "foreground": [[40, 32, 12]], "background": [], "roi": [], "slice": 12}
    first = _infer(client, "samora_prompt", image, params)
    second = _infer(client, "samora_prompt", image, {**params, "foreground": [[41, 33, 12]]})
    assert first.status_code == second.status_code == 200


def test_uncertainty_strategy_picks_highest_score(client):
    r = client.post("/scoring/samora_uncertainty?run_sync=true")
    assert r.status_code == 200, r.text
    r = client.post("/activelearning/uncertainty", json={})
    assert r.status_code == 200, r.text
    picked = r.json()["id"]
    assert picked in client.store["unlabeled"]
    # no trained version yet: no meaningless ranking, a random pick that says so
    assert r.json()["strategy"] == "random" and r.json()["model_version"] == 0


def test_a_version_trained_under_another_label_order_is_served_in_the_confs_numbers(tmp_path, monkeypatch):
    """Labels are one truth by name: a model trained with liver=1... and served after a restart with the conf's
    labels in another order answers in the conf's numbers, every organ's voxels unchanged."""
    import nibabel as nib
    import numpy as np
    from conftest import app_client

    from samora.data import PHANTOM_LABELS

    def segment(client):
        image = client.store["unlabeled"][0]
        r = client.post(f"/infer/samora?image={image}&output=image", data={"params": "{}"})
        assert r.status_code == 200, r.text
        path = tmp_path / "out.nii.gz"
        path.write_bytes(r.content)
        result = client.post(f"/infer/samora?image={image}&output=json", data={"params": "{}"}).json()
        return np.asarray(nib.load(str(path)).dataobj), result

    with app_client(tmp_path, monkeypatch, epochs=15, train_mode="full") as client:
        assert client.post("/train/samora?run_sync=true", json={}).status_code == 200
        trained, first = segment(client)
    assert first["label_names"] == PHANTOM_LABELS
    assert len(set(np.unique(trained).tolist()) - {0}) >= 2, "the model must label organs for this check to mean much"
    reordered = {name: i + 1 for i, name in enumerate(reversed(list(PHANTOM_LABELS)))}
    conf_labels = ",".join(f"{name}={idx}" for name, idx in reordered.items())
    with app_client(tmp_path, monkeypatch, labels=conf_labels) as client:
        assert client.get("/info/").json()["models"]["samora"]["labels"] == reordered
        served, second = segment(client)
    assert second["label_names"] == reordered and second["model_version"] == 1
    for name in PHANTOM_LABELS:
        np.testing.assert_array_equal(trained == PHANTOM_LABELS[name], served == reordered[name], err_msg=name)


@pytest.mark.parametrize("fusion, queued", [("auto", ["samora", "samora_ssl"]), ("reduced", ["samora"])])
def test_start_queues_the_bootstrap_where_experts_act(tmp_path, monkeypatch, fusion, queued):
    """Cached mode (this CPU) with the default fusion (the experts' sum) queues the first version, then the SSL
    bootstrap; with HL-Attn, which cached training never trains, the bootstrap is skipped."""
    from conftest import app_client
    from monailabel.interfaces.app import MONAILabelApp

    calls = []
    monkeypatch.setattr(
        MONAILabelApp, "async_training", lambda self, model, params=None, enqueue=False: calls.append((model, enqueue))
    )
    with app_client(tmp_path, monkeypatch, bootstrap="auto", fusion=fusion):
        pass
    assert calls == [(name, True) for name in queued]


@pytest.mark.parametrize(
    "conf",
    [
        {"train_mode": "full", "finetune_experts": "false", "epochs": 1},
        {"train_mode": "cached", "epochs": 1},  # fusion auto: the frozen experts' sum, so they act without training
    ],
    ids=["full", "cached-sum"],
)
def test_experts_from_a_later_bootstrap_reach_a_new_version_when_it_ends(tmp_path, monkeypatch, conf):
    """Version 1 is trained before any SSL expert exists; the bootstrap ends after it and publishes version 2 trained
    from those experts (frozen in stage 2), which changes the encoder's embedding."""
    import copy

    import torch
    from conftest import app_client

    from samora.adapters.experts import expert_parameters
    from samora.engine.embeddings import encoder_fingerprint
    from samora.engine.store import ModelStore
    from samora.model import SamoraModel
    from samora.ssl.experts_io import load_experts

    with app_client(tmp_path, monkeypatch, **conf) as client:
        assert client.post("/train/samora?run_sync=true", json={}).status_code == 200
        r = client.post("/train/samora_ssl?run_sync=true", json={})
        assert r.status_code == 200, r.text
        assert r.json()["refreshed"]["model_version"] == 2, r.json()
    store = ModelStore(tmp_path / "model")
    version, trained = store.load_current()
    assert version == 2 and store.expert_files()
    first = SamoraModel.load(store.path(1))
    assert first.config.fusion == trained.config.fusion == ("reduced" if conf["train_mode"] == "full" else "sum")
    expected = copy.deepcopy(trained)
    assert load_experts(expected, store.experts_dir) == ["image", "patch", "pixel"]
    for level in ("image", "patch", "pixel"):
        got = expert_parameters(trained.backbone.encoder, level)
        want = expert_parameters(expected.backbone.encoder, level)
        assert any(float(p.abs().max()) > 0 for k, p in want.items() if ".lora_B." in k), f"{level}: zero expert"
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{level} {key}: version 2 does not carry the bootstrap's expert"
    if conf["train_mode"] == "cached":  # a new embedding folder, and embeddings that differ from version 1's
        fingerprints = encoder_fingerprint(first), encoder_fingerprint(trained)
        assert fingerprints[0] != fingerprints[1]
        folders = [p.name for p in (tmp_path / "model" / "embeddings").iterdir()]
        assert all(any(name.startswith(f) for name in folders) for f in fingerprints), (fingerprints, folders)
        image = torch.rand(1, 3, trained.config.image_size, trained.config.image_size)
        with torch.no_grad():
            assert not torch.allclose(first.encode(image), trained.encode(image), atol=1e-4)


def test_a_failed_refresh_after_the_bootstrap_keeps_its_experts_and_says_why(tmp_path, monkeypatch):
    """The bootstrap's own work (the experts) is saved before the version refresh; a refresh that fails leaves the
    bootstrap DONE, the served version as it was, and the `samora` trainer's stats naming the reason."""
    from conftest import app_client

    import samora.serving.finetuning as finetuning
    from samora.engine.store import ModelStore

    with app_client(tmp_path, monkeypatch, epochs=1) as client:
        assert client.post("/train/samora?run_sync=true", json={}).status_code == 200

        def broken(*args, **kwargs):
            raise RuntimeError("disk full while training")

        monkeypatch.setattr(finetuning, "finetune", broken)
        r = client.post("/train/samora_ssl?run_sync=true", json={})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "DONE" and "disk full" in r.json()["refreshed"]["error"]
        stats = client.get("/info/").json()["train_stats"]
        assert stats["samora"]["status"] == "ERROR" and "disk full" in stats["samora"]["error"]
        assert stats["samora_ssl"]["status"] == "DONE"
    store = ModelStore(tmp_path / "model")
    assert store.current_version() == 1 and len(store.expert_files()) == 3
