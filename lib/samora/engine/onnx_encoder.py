"""The image encoder exported to ONNX and run by ONNX Runtime or OpenVINO: CPU inference paths for the start-up
probe.

The export is of a BN-folded copy of the served model's encoder. Where the caller gives a folder, the graph is kept
there under a hash of the weights, input size and traced code (graph_cache), so a restart or a new model version
whose encoder did not change loads it instead of exporting again; nothing kept can go stale. A runtime is
offered only where `onnx` (the exporter writes through it) and the runtime's package import. OpenVINO also runs the
graph with bf16 inference precision on CPUs that compute bf16 natively (its own choice of which operations stay
f32, which kept the embedding closer to fp32 than torch's bf16 autocast: 3.6% against 4.5% relative error).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from samora.engine import graph_cache

log = logging.getLogger(__name__)

RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
POLL_MS = 5  # how often a cancellable inference checks whether to give up (a slice takes ~600 ms on 2 cores)


class EncodeCancelled(Exception):
    """A cancellable encode gave up part-way because its stop condition became true (nothing was stored). Not a
    RuntimeError, which the start-up probe reads as a path that cannot run here."""


_cancel = threading.local()


@contextlib.contextmanager
def cancellable(should_stop: Callable[[], bool]):
    """Inside, an OpenVINO inference on this thread polls `should_stop()` and is cancelled (EncodeCancelled) as soon
    as it is true: background encoding gives the cores back to a request at once instead of after its slice. The
    other paths cannot stop mid-slice and finish it."""
    _cancel.should_stop = should_stop
    try:
        yield
    finally:
        _cancel.should_stop = None


def stop_requested() -> bool:
    """Whether this thread runs inside `cancellable` and its stop condition is true now."""
    should_stop = getattr(_cancel, "should_stop", None)
    return should_stop is not None and should_stop()


def available(runtime: str = "onnxruntime") -> bool:
    """Whether this environment can export (onnx) and run (`runtime`) the encoder."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", RUNTIME_PACKAGES[runtime]))


class _EmbeddingOf(nn.Module):
    """The backbone's encode() on one encoder copy, returning only the embedding tensor (what ONNX can trace)."""

    def __init__(self, backbone_type: type, encoder: nn.Module) -> None:
        super().__init__()
        self.backbone_type, self.encoder = backbone_type, encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone_type.encode(SimpleNamespace(encoder=self.encoder), images).embedding


def export_graph(backbone_type: type, encoder: nn.Module, image_size: int) -> bytes:
    """The encoder's ONNX graph for one (1, 3, S, S) slice. TinyViT's patch merging reshapes with the traced batch
    size, so a graph exported with a dynamic batch fails on any other: the runners below go slice by slice (on 2
    cores batch 1 is also the fastest)."""
    graph = io.BytesIO()
    example = torch.zeros(1, 3, image_size, image_size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic: the graph is for one slice
            torch.onnx.export(
                _EmbeddingOf(backbone_type, encoder).eval(),
                (example,),
                graph,
                input_names=["images"],
                output_names=["embedding"],
                dynamo=False,  # the TorchScript exporter: no onnxscript, and it traces TinyViT as is
            )
    except Exception as e:  # the exporter raises many types; the probe needs one it can skip this path on
        raise RuntimeError(f"exporting the encoder to ONNX failed: {e}") from e
    return graph.getvalue()


class ExportedEncoder:
    """`encoder` (of a backbone of type `backbone_type`) exported at `image_size` and run on the CPU by `runtime`
    ("onnxruntime" or "openvino", the latter in `precision` "f32" or "bf16") with as many threads as torch uses;
    callable on (B, 3, S, S) float32 images, returns float32 embeddings."""

    def __init__(
        self,
        backbone_type: type,
        encoder: nn.Module,
        image_size: int,
        runtime: str = "onnxruntime",
        precision="f32",
        graph_dir: str | os.PathLike | None = None,
    ) -> None:
        start = time.perf_counter()

        def make_runner(graph: bytes):
            return _ort_runner(graph) if runtime == "onnxruntime" else _openvino_runner(graph, precision)

        def export() -> bytes:
            return export_graph(backbone_type, encoder, image_size)

        if graph_dir is None:
            self._run_one = make_runner(export())
        else:  # the graph kept from an earlier export of the same encoder, where there is one (graph_cache)
            key = graph_cache.graph_key(backbone_type, encoder, image_size)
            self._run_one = graph_cache.runner_from_kept_graph(graph_dir, key, export, make_runner)
        log.info("encoder graph ready for %s (%s) in %.1f s", runtime, precision, time.perf_counter() - start)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(np.concatenate([self._run_one(array[i : i + 1]) for i in range(len(array))]))


def _ort_runner(graph: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return lambda one: session.run(["embedding"], {"images": one})[0]


def _openvino_runner(graph: bytes, precision: str):
    import openvino

    core = openvino.Core()
    config = {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",  # one stream: a slice at a time on every thread
    }
    compiled = core.compile_model(core.read_model(graph), "CPU", config)
    # an infer request runs one inference at a time ("Infer Request is busy" otherwise), and the server encodes from
    # two threads (a request and the background pre-encoding): one request per thread
    requests = threading.local()

    def run_one(one: np.ndarray) -> np.ndarray:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        request = requests.request
        if getattr(_cancel, "should_stop", None) is None:
            return request.infer({0: one})[0].copy()  # the request reuses its output buffer
        request.start_async({0: one})
        while not request.wait_for(POLL_MS):
            if stop_requested():
                request.cancel()
                with contextlib.suppress(RuntimeError):  # waiting on a cancelled request raises
                    request.wait()
                raise EncodeCancelled("encoding cancelled for a foreground request")
        return request.get_output_tensor(0).data.copy()

    return run_one
