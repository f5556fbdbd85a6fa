"""The image encoder exported to ONNX and run by ONNX Runtime: one more CPU inference path for the start-up probe.

The export is of a BN-folded copy of the served model's encoder, in memory (no file to go stale when a new version
changes the experts): a new model version is exported again when the runtime builds its encoder. Offered only where
both `onnx` (the exporter writes through it) and `onnxruntime` import.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether this environment can export (onnx) and run (onnxruntime) the encoder."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


class _EmbeddingOf(nn.Module):
    """The backbone's encode() on one encoder copy, returning only the embedding tensor (what ONNX can trace)."""

    def __init__(self, backbone_type: type, encoder: nn.Module) -> None:
        super().__init__()
        self.backbone_type, self.encoder = backbone_type, encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone_type.encode(SimpleNamespace(encoder=self.encoder), images).embedding


class OnnxEncoder:
    """`encoder` (of a backbone of type `backbone_type`) exported at `image_size` and run by ONNX Runtime on the CPU,
    with as many threads as torch uses; callable on (B, 3, S, S) float32 images, returns float32 embeddings.

    The graph takes one slice: TinyViT's patch merging reshapes with the traced batch size, so a graph exported with
    a dynamic batch fails on any other; a batch is run slice by slice (on 2 cores batch 1 is also the fastest)."""

    def __init__(self, backbone_type: type, encoder: nn.Module, image_size: int) -> None:
        import onnxruntime

        start = time.perf_counter()
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
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
        log.info("encoder exported to ONNX in %.1f s", time.perf_counter() - start)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        embeddings = [self.session.run(["embedding"], {"images": array[i : i + 1]})[0] for i in range(len(array))]
        return torch.from_numpy(np.concatenate(embeddings))
