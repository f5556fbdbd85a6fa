"""Exported encoder graphs kept on disk (samora.engine.graph_cache), tiny preset, CPU."""

from __future__ import annotations

import os
import time

import pytest
import torch

from samora.config import ModelConfig
from samora.engine import graph_cache, onnx_encoder
from samora.engine.encoder_path import PATHS, PathEncoder
from samora.model import SamoraModel

pytestmark = pytest.mark.skipif(not onnx_encoder.available("onnxruntime"), reason="needs onnx and onnxruntime")


def _model(seed: int = 0) -> SamoraModel:
    return SamoraModel(ModelConfig(preset="tiny", image_size=64, labels={"liver": 1}, init_seed=seed)).eval()


def _counting_exports(monkeypatch) -> list:
    calls, real_export = [], onnx_encoder.export_graph
    monkeypatch.setattr(onnx_encoder, "export_graph", lambda *a: calls.append(a) or real_export(*a))
    return calls


def test_a_second_build_of_the_same_encoder_loads_the_kept_graph_instead_of_exporting(monkeypatch, tmp_path):
    exports = _counting_exports(monkeypatch)
    images = torch.rand(2, 3, 64, 64)
    first = PathEncoder(_model(), PATHS["onnx"], graph_dir=tmp_path)
    assert len(exports) == 1 and len(list((tmp_path / graph_cache.FOLDER).glob("*.onnx"))) == 1
    again = PathEncoder(_model(), PATHS["onnx"], graph_dir=tmp_path)  # a restart: a new model, the same weights
    assert len(exports) == 1
    torch.testing.assert_close(again(images), first(images), rtol=0, atol=0)
    other = _model(seed=1)  # other weights: another graph
    PathEncoder(other, PATHS["onnx"], graph_dir=tmp_path)
    assert len(exports) == 2 and len(list((tmp_path / graph_cache.FOLDER).glob("*.onnx"))) == 2
    PathEncoder(_model(), PATHS["onnx"])  # no folder given: exported in memory, as before
    assert len(exports) == 3


def test_the_key_follows_every_weight_and_the_input_size():
    model = _model()
    encoder = model.backbone.encoder
    key = graph_cache.graph_key(type(model.backbone), encoder, 64)
    assert graph_cache.graph_key(type(model.backbone), encoder, 64) == key
    assert graph_cache.graph_key(type(model.backbone), encoder, 128) != key
    with torch.no_grad():
        name, tensor = list(encoder.state_dict().items())[-1]  # a buffer or the last weight: every entry counts
        tensor.view(-1)[0] += 1
    assert graph_cache.graph_key(type(model.backbone), encoder, 64) != key, name


def test_a_kept_graph_that_does_not_load_is_exported_again_and_replaced(monkeypatch, tmp_path, caplog):
    exports = _counting_exports(monkeypatch)
    first = PathEncoder(_model(), PATHS["onnx"], graph_dir=tmp_path)
    (kept,) = (tmp_path / graph_cache.FOLDER).glob("*.onnx")
    kept.write_bytes(b"not an onnx graph")  # a torn copy, a full disk
    with caplog.at_level("WARNING"):
        again = PathEncoder(_model(), PATHS["onnx"], graph_dir=tmp_path)
    assert "does not load" in caplog.text and len(exports) == 2
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(again(images), first(images), rtol=0, atol=0)
    assert kept.read_bytes() != b"not an onnx graph"


def test_the_folder_keeps_the_most_recently_used_graphs(tmp_path):
    (tmp_path / graph_cache.FOLDER).mkdir()
    for n in range(graph_cache.KEEP + 2):  # graphs kept earlier, key0 the oldest
        path = graph_cache.graph_file(tmp_path, f"key{n}")
        path.write_bytes(b"graph")
        os.utime(path, (time.time() - 100 + n, time.time() - 100 + n))
    assert graph_cache.load(tmp_path, "key0") == b"graph"  # used again just now: newest
    graph_cache.save(tmp_path, "newest", b"graph")
    names = {p.stem for p in (tmp_path / graph_cache.FOLDER).glob("*.onnx")}
    assert len(names) == graph_cache.KEEP and {"newest", "key0"} <= names and "key1" not in names
