"""Training on several processes (torchrun, DDP, gloo on CPU): the same weights as one process, one set of files,
the process plan's errors, and the app's multi-GPU train request on a machine without a GPU."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samora.cli import main as samora_cli
from samora.config import EXPERTS, ModelConfig
from samora.data import PHANTOM_LABELS, write_phantom_studies
from samora.distributed import ProcessPlan, plan_processes
from samora.distributed.jobs import run_finetune_job
from samora.engine.train import FinetuneConfig, finetune, load_labeled_cases
from samora.model import SamoraModel

SIZE = 64
# Weights of N processes agree with one process to float32 summation order (measured ~1e-6), not bit for bit.
RTOL = 1e-5


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all tensors together."""
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist") / "studies"
    write_phantom_studies(folder, n_labeled=2, n_unlabeled=1, seed=3, shape=(64, 64, 24))
    return folder


def test_ssl_experts_on_two_processes_equal_one(studies, tmp_path):
    """Each expert, 4 steps of global batch 4: `--nproc 2` (2 gloo ranks of 2 slices each, DDP-averaged gradients;
    the image level's batch norm and NT-Xent negatives on the gathered batch; the patch level's masks drawn for the
    global batch) ends where one process ends. Only rank 0 writes, so both folders hold the same files."""
    common = ["pretrain", "--studies", str(studies), "--image-size", str(SIZE), "--max-steps", "4"]
    common += ["--batch-size", "4", "--no-progress", "--device", "cpu", "--checkpoint-every", "2"]
    assert samora_cli([*common, "--out", str(tmp_path / "one")]) == 0
    assert samora_cli([*common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    for level in EXPERTS:
        one, two = (load_file(tmp_path / d / f"expert_{level}.safetensors") for d in ("one", "two"))
        untrained = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in one.items()}
        assert _distance(one, untrained) > 0, level  # the expert did move in 4 steps
        assert _relative_difference(one, two) < RTOL, level
        logs = [(tmp_path / d / f"loss_{level}.jsonl").read_text().splitlines() for d in ("one", "two")]
        assert len(logs[0]) == len(logs[1]) == 4  # one log, not one per rank
    files = {
        d: sorted(p.relative_to(tmp_path / d).as_posix() for p in (tmp_path / d).rglob("*")) for d in ("one", "two")
    }
    assert files["one"] == files["two"]


@pytest.mark.parametrize("mode", ["cached", "full"])
def test_stage2_on_two_processes_equals_one(studies, tmp_path, mode):
    """Global batch 5 over 13 slices: the 3rd batch has 3 slices, split 2 + 1 (padded and dropped after the
    gather). `full` runs the seeded augmentation, which follows the global batch position. The prompt path is off:
    its simulated prompts are drawn per rank, so they are not the same as one process's."""
    labeled = sorted((studies / "labels" / "final").glob("*.nii.gz"))
    cases = [(p.name.split(".")[0], str(studies / p.name), str(p)) for p in labeled]
    train = load_labeled_cases(cases, SIZE).subset(range(13))
    model = SamoraModel(ModelConfig(preset="tiny", image_size=SIZE, labels=PHANTOM_LABELS))
    config = dict(epochs=1, batch_size=5, lr=3e-3, prompt_training=False, mode=mode, max_steps=3)
    single = copy.deepcopy(model)
    finetune(single, train, FinetuneConfig(**config, embedding_dir=str(tmp_path / "emb1")))
    shared = tmp_path / "emb2"
    trained, result = run_finetune_job(
        tmp_path / "jobs",
        ProcessPlan(2, "cpu"),
        model,
        train,
        None,
        FinetuneConfig(**config, embedding_dir=str(shared)),
        {},
    )
    assert result["steps"] == 3
    assert _distance(single.saved_state(), model.saved_state()) > 1e-3
    assert _relative_difference(single.saved_state(), trained.saved_state()) < RTOL
    if mode == "cached":  # each slice encoded once, by one of the ranks, into the shared folder
        assert len(list(shared.rglob("*.npy"))) == len(np.unique([im.tobytes() for im in train.images]))
    assert not any((tmp_path / "jobs").iterdir())  # the job's copies are removed


def test_process_plan_refuses_bad_requests_and_falls_back_without_gpus():
    with pytest.raises(ValueError, match="positive integer"):
        plan_processes("cpu", nproc=0)
    with pytest.raises(ValueError, match="do not exist"):
        plan_processes("cuda", gpus=[torch.cuda.device_count()], multi_gpu=True)
    with pytest.raises(ValueError, match="'all' or GPU indices"):
        plan_processes("cuda", gpus="first", multi_gpu=True)
    assert plan_processes("cpu", nproc=2).nproc == 2
    assert plan_processes("cpu", gpus="all", multi_gpu=False).nproc == 1
    fallback = plan_processes("cpu", gpus="all", multi_gpu=True)
    assert fallback.nproc == 1 and "one process" in fallback.reason
    gloo = plan_processes("cpu", gpus="all", multi_gpu=True, cpu_processes=2)
    assert gloo.nproc == 2 and gloo.device == "cpu" and gloo.launches


@pytest.mark.parametrize("cpu_processes", [0, 2])
def test_app_trainer_takes_a_multi_gpu_request_on_a_cpu_machine(tmp_path, monkeypatch, caplog, cpu_processes):
    """{"gpus": "all", "multi_gpu": true} without a GPU: one process with the reason logged, or (conf
    dist_cpu_processes 2) two gloo processes; a version is published and the SSL experts written either way."""
    from conftest import app_client

    caplog.set_level(logging.INFO)
    with app_client(tmp_path, monkeypatch, dist_cpu_processes=cpu_processes, epochs=1) as client:
        r = client.post("/train/samora?run_sync=true", json={"gpus": "all", "multi_gpu": True})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == 1 and r.json()["processes"] == max(1, cpu_processes)
        bad = client.post("/train/samora?run_sync=true", json={"gpus": [7], "multi_gpu": True})
        assert bad.status_code == 422 and "gpus" in bad.text
        ssl = client.post("/train/samora_ssl?run_sync=true", json={"gpus": "all", "multi_gpu": "true"})
        assert ssl.status_code == 200, ssl.text
        assert ssl.json()["processes"] == max(1, cpu_processes)
        assert {level: s["steps"] for level, s in ssl.json()["levels"].items()} == dict.fromkeys(EXPERTS, 4)
    experts = sorted(p.name for p in (tmp_path / "model" / "experts").glob("expert_*.safetensors"))
    assert experts == [f"expert_{level}.safetensors" for level in sorted(EXPERTS)]
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training processes:")]
    expected = "2 gloo CPU processes" if cpu_processes else "training in one process"
    assert reasons and expected in reasons[0], reasons


def test_finetune_cli_publishes_a_version_and_refuses_nproc_0(studies, tmp_path, capsys):
    common = ["finetune", "--studies", str(studies), "--out", str(tmp_path / "model"), "--image-size", str(SIZE)]
    common += ["--labels", "liver=1,spleen=2,kidney_left=3,kidney_right=4,spine=5", "--epochs", "1", "--device", "cpu"]
    assert samora_cli([*common, "--nproc", "0"]) == 2
    assert "--nproc must be a positive integer" in capsys.readouterr().err
    assert samora_cli(common) == 0
    from samora.engine.store import ModelStore

    version, model = ModelStore(tmp_path / "model").load_current()
    assert version == 1 and model.config.labels["spine"] == 5
