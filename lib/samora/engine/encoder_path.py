"""Encoder inference paths (precision, conv+BN folding, memory layout) and the start-up probe that picks one.

For inference; in training only cached mode's one-off embeddings of a pretrained encoder take one
(TrainingEncoder): the SSL bootstrap and full-mode training back-propagate through `SamoraModel.encode` in their own
precision. A path runs on its own copy of the encoder (BN folded into the convolutions, weights in channels-last
where asked), so the served model itself is never altered. Embeddings always come back as float32 for the decoders.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch
from torch import nn

from samora.engine import onnx_encoder, probe_record
from samora.engine.precision import cpu_supports_bf16
from samora.model import SamoraModel

log = logging.getLogger(__name__)

# Relative L2 error of the embedding against fp32 that a path may have and still be picked. A coarse guard against
# broken paths (fp16 overflow, a kernel bug); the real accuracy guard is the zero-shot Dice benchmark
# (bench/zeroshot.py --encoder-path, docs/benchmarks.md), where bf16 at this level moved Dice by < 0.005.
TOLERANCE = 0.05
EXACT = 1e-4  # fp32 with folded BN differs from fp32 by rounding only (measured 3e-6)
LOSSY_MARGIN = 0.9  # a lossy path is kept only if it takes under 90% of the best exact path's time


@dataclass(frozen=True)
class EncoderPath:
    """One way to run the encoder: autocast dtype (None = fp32; for OpenVINO its inference precision), BN folded,
    channels-last activations, and the engine that runs it (torch, or the exported graph in ONNX Runtime or
    OpenVINO)."""

    name: str
    dtype: torch.dtype | None = None
    fused: bool = False
    channels_last: bool = False
    engine: str = "torch"


PATHS: dict[str, EncoderPath] = {
    p.name: p
    for p in (
        EncoderPath("fp32"),
        EncoderPath("fp32-fused", fused=True),
        EncoderPath("bf16", torch.bfloat16, fused=True),
        EncoderPath("bf16-cl", torch.bfloat16, fused=True, channels_last=True),
        EncoderPath("fp16", torch.float16, fused=True),
        EncoderPath("onnx", fused=True, engine="onnxruntime"),
        EncoderPath("openvino", fused=True, engine="openvino"),
        EncoderPath("openvino-bf16", torch.bfloat16, fused=True, engine="openvino"),
    )
}
CHOICES = ("auto", *PATHS)


# Lossy CPU paths failed the zero-shot Dice guard (docs/benchmarks.md §4.2): bf16-cl and openvino-bf16 each moved
# the right adrenal gland's Dice by -0.013 (guard 0.005), and bf16 computes as bf16-cl does (embedding errors within
# 0.0001). The probe never chooses them; a user who segments large organs only can force one (conf encoder_path).
GUARD_FAILED_CPU = ("bf16", "bf16-cl", "openvino-bf16")


def candidates(device: str | torch.device) -> list[str]:
    """Paths the start-up probe may choose on this device, fp32 first (the reference)."""
    if torch.device(device).type == "cuda":
        return ["fp32", "fp32-fused", "bf16", "fp16"]
    return [
        "fp32",
        "fp32-fused",
        *(["onnx"] if onnx_encoder.available("onnxruntime") else []),
        *(["openvino"] if onnx_encoder.available("openvino") else []),
    ]


def benchmarked(device: str | torch.device) -> list[str]:
    """The probe's candidates and, on a CPU that computes bf16 natively, the lossy paths a user may force
    (bench/speed.py times them all)."""
    if torch.device(device).type == "cuda" or not cpu_supports_bf16():
        return candidates(device)
    lossy = [p for p in GUARD_FAILED_CPU if PATHS[p].engine == "torch" or onnx_encoder.available(PATHS[p].engine)]
    return candidates(device) + lossy


def fold_batch_norms(module: nn.Module) -> int:
    """Replace every conv+BN pair that knows how to fold itself (TinyViT's Conv2d_BN.fuse) by one conv."""
    folded = 0
    for name, child in list(module.named_children()):
        if hasattr(child, "fuse") and isinstance(getattr(child, "bn", None), nn.BatchNorm2d):
            setattr(module, name, child.fuse())
            folded += 1
        else:
            folded += fold_batch_norms(child)
    return folded


class PathEncoder:
    """Runs `model`'s encoder the way `path` says; callable like SamoraModel.encode, returns float32."""

    def __init__(
        self, model: SamoraModel, path: EncoderPath, device: str | torch.device = "cpu", graph_dir=None
    ) -> None:
        """`graph_dir`: where an exported path keeps its graph for later builds of the same encoder (graph_cache)."""
        self.path, self.device, self.model = path, torch.device(device), model
        if path.engine != "torch":
            self._check_exported_runs_here()  # before copying the encoder for nothing
        encoder = model.backbone.encoder
        if path.fused or path.channels_last:
            encoder = copy.deepcopy(encoder).eval()
            if path.fused:
                fold_batch_norms(encoder)
            if path.channels_last:
                encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder
        self.onnx = self._exported(model, path, graph_dir) if path.engine != "torch" else None

    def _check_exported_runs_here(self) -> None:
        if self.device.type != "cpu":
            raise ValueError(f"encoder path {self.path.name!r} runs on the CPU only, not on {self.device}")
        if not onnx_encoder.available(self.path.engine):
            raise RuntimeError(f"encoder path {self.path.name!r} needs the onnx and {self.path.engine} packages")

    def _exported(self, model: SamoraModel, path: EncoderPath, graph_dir) -> onnx_encoder.ExportedEncoder:
        precision = "bf16" if path.dtype == torch.bfloat16 else "f32"
        size = model.config.image_size
        return onnx_encoder.ExportedEncoder(
            type(model.backbone), self.encoder, size, runtime=path.engine, precision=precision, graph_dir=graph_dir
        )

    def _autocast(self):
        if self.path.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.path.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != size:
            raise ValueError(f"expected images (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if self.onnx is not None:
            return self.onnx(images)  # a fresh contiguous float32 array from the exported graph's runtime
        if self.path.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            # the backbone's own encode (SAM2 picks its embedding out of a dict), run on this path's encoder copy
            embedding = type(self.model.backbone).encode(SimpleNamespace(encoder=self.encoder), images).embedding
        return embedding.float().contiguous()


class TrainingEncoder:
    """The encoder cached-mode training stores a pretrained backbone's embeddings with: an exported graph on a CPU.

    Training needs no probe: every exact path gives the same fp16-stored embedding, so only speed differs. OpenVINO
    in f32 came first on the AVX-512 host (0.58 s/slice against ONNX Runtime's 0.78 and eager fp32's 1.71, idle,
    docs/benchmarks.md §4), ONNX Runtime next (2.2x eager fp32 on AVX2, 2.4x on AVX-512, session 11); the first one
    installed is used. Exported on the first slice to encode (a training that finds every slice cached pays
    nothing); if the export fails, the BN-folded torch encoder takes over (exact to rounding too, so the folder's
    embeddings stay interchangeable)."""

    PREFERENCE = ("openvino", "onnx")

    def __init__(self, model: SamoraModel) -> None:
        self.model, self.encoder = model, None
        self.path_name = self.installed_path()

    @classmethod
    def installed_path(cls) -> str | None:
        """The first exact exported path whose runtime is installed (None: neither is)."""
        return next((name for name in cls.PREFERENCE if onnx_encoder.available(PATHS[name].engine)), None)

    @classmethod
    def suits(cls, model: SamoraModel, device: str | torch.device) -> bool:
        """A pretrained (full-size, ~1 s per slice) encoder on a CPU with OpenVINO or ONNX Runtime installed; the
        random tiny presets encode in milliseconds, less than an export costs."""
        return torch.device(device).type == "cpu" and model.backbone.pretrained and cls.installed_path() is not None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            try:
                self.encoder = PathEncoder(self.model, PATHS[self.path_name])
            except (RuntimeError, ValueError) as e:
                log.warning("training embeddings: %s export failed (%s); encoding with fp32-fused", self.path_name, e)
                self.encoder = PathEncoder(self.model, PATHS["fp32-fused"])
        return self.encoder(images)


@dataclass
class ProbeResult:
    """What the start-up probe measured and chose (logged, and shown per model in /info)."""

    chosen: str
    forced: bool
    device: str
    rows: list[dict] = field(default_factory=list)
    # when the rows were measured (UTC, ISO), and whether this start reused an earlier start's probe (probe_record)
    measured: str | None = None
    reused: bool = False
    # the chosen path's encoder as the probe built it, handed to the first user (an ONNX export costs ~12 s)
    built: PathEncoder | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        # every field but the built encoder (which asdict would try to deep-copy, ONNX session included)
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "built"}

    def take_encoder(self, model: SamoraModel) -> PathEncoder | None:
        """The encoder the probe built for `model`, once (later model versions build their own); else None."""
        built, self.built = self.built, None
        return built if built is not None and built.model is model else None


def _probe_images(model: SamoraModel, batch: int, device) -> torch.Tensor:
    """Smooth structured images (not white noise, whose embedding errors are unlike a scan's), seeded."""
    gen = torch.Generator().manual_seed(0)
    size = model.config.image_size
    coarse = torch.rand(batch, 3, size // 16, size // 16, generator=gen)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).to(device)


def _time(encoder: PathEncoder, images: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Seconds per slice of the fastest of `repeats` timed encodes (after a warm-up), and the last output. The
    fastest, not the mean: one encode slowed by another process would otherwise decide the server's path for its
    lifetime (a single timing once put openvino at 1.05 s/slice against its 0.6, and onnx was chosen)."""
    out = encoder(images)  # warm-up: oneDNN primitive creation, allocator
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = encoder(images)
        seconds.append(time.perf_counter() - start)
    return min(seconds) / len(images), out


def probe(
    model: SamoraModel,
    device: str | torch.device,
    names: list[str] | None = None,
    repeats: int = 2,
    batch: int = 1,
    graph_dir=None,
) -> ProbeResult:
    """Time each candidate path, check its embedding against fp32, choose the fastest within TOLERANCE."""
    names = names or candidates(device)
    images = _probe_images(model, batch, device)
    built = {"fp32": PathEncoder(model, PATHS["fp32"], device)}
    reference_seconds, reference = _time(built["fp32"], images, repeats)
    rows = [{"path": "fp32", "s_per_slice": reference_seconds, "relative_error": 0.0, "ok": True}]
    for name in names:
        if name == "fp32":
            continue
        try:
            start = time.perf_counter()
            encoder = built[name] = PathEncoder(model, PATHS[name], device, graph_dir)
            prepare_seconds = time.perf_counter() - start  # the BN fold, or the ONNX export
            seconds, out = _time(encoder, images, repeats)
            error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
            ok = bool(torch.isfinite(out).all()) and error <= TOLERANCE
            rows.append(
                {"path": name, "s_per_slice": seconds, "relative_error": error, "ok": ok, "prepare_s": prepare_seconds}
            )
        except RuntimeError as e:  # a kernel missing for this dtype on this device
            rows.append({"path": name, "s_per_slice": None, "relative_error": None, "ok": False, "error": str(e)})
        # only a path that can still win keeps its encoder copy (or ONNX session): the probe's memory peak stays
        # at two or three copies of the encoder however many paths it tries
        contenders = set(_leaders(rows))
        for loser in [n for n in built if n not in contenders]:
            del built[loser]
        encoder = out = None  # and this loop's own references go before the next candidate is built
    exact, fastest = _leaders(rows)
    # a lossy path must win clearly: near-equal timings would otherwise flip the choice (and the masks' last
    # pixels) from one restart to the next
    chosen = fastest if _seconds(rows, fastest) < LOSSY_MARGIN * _seconds(rows, exact) else exact
    measured = dt.datetime.now(dt.timezone.utc).isoformat()
    return ProbeResult(
        chosen=chosen, forced=False, device=str(device), rows=rows, measured=measured, built=built[chosen]
    )


def _leaders(rows: list[dict]) -> tuple[str, str]:
    """The fastest exact path and the fastest passing one (lossy or not) among the rows so far."""
    passing = [r for r in rows if r["ok"]]
    exact = min((r for r in passing if r["relative_error"] <= EXACT), key=lambda r: r["s_per_slice"])
    fastest = min(passing, key=lambda r: r["s_per_slice"])
    return exact["path"], fastest["path"]


def _seconds(rows: list[dict], name: str) -> float:
    return next(r["s_per_slice"] for r in rows if r["path"] == name)


def select(
    model: SamoraModel, device: str | torch.device, setting: str = "auto", record_dir: str | os.PathLike | None = None
) -> ProbeResult:
    """The path conf `encoder_path` asks for: probed when "auto" (or the choice of an earlier probe on this machine
    kept in `record_dir`, where given; exported paths keep their graphs there too), else taken as given (no probe)."""
    if setting not in CHOICES:
        raise ValueError(f"encoder path {setting!r} is not one of {CHOICES}")
    if setting != "auto":
        return ProbeResult(chosen=setting, forced=True, device=str(device))
    names = candidates(device)
    key = probe_record.probe_key(model.config, device, names)
    result = _reused(model, device, record_dir, key) if record_dir is not None else None
    if result is None:
        before = probe_record.cpu_snapshot()
        result = probe(model, device, names, graph_dir=record_dir)
        if record_dir is not None:
            _keep_if_quiet(result, record_dir, key, probe_record.others_busy_share(before, probe_record.cpu_snapshot()))
    table = ", ".join(
        f"{r['path']} {r['s_per_slice']:.3f} s/slice err {r['relative_error']:.4f}{'' if r['ok'] else ' (rejected)'}"
        for r in result.rows
        if r["s_per_slice"] is not None
    )
    how = f"kept from the probe of {result.measured}" if result.reused else "probe"
    log.info("encoder path %s on %s: %s -> %s", how, device, table, result.chosen)
    return result


def _keep_if_quiet(result: ProbeResult, record_dir, key: dict, others_share: float) -> None:
    """Keep the probe's choice for later starts, unless other processes were busy while it timed the paths."""
    if others_share > probe_record.BUSY_SHARE:
        log.warning(
            "other processes kept %.0f%% of the CPU busy during the encoder path probe: its choice (%s) serves this "
            "start but is not kept; the next start probes again",
            100 * others_share,
            result.chosen,
        )
        return
    probe_record.save(record_dir, key, result.chosen, result.rows, result.measured)


def _reused(model: SamoraModel, device, record_dir, key: dict) -> ProbeResult | None:
    """The choice an earlier probe under `key` kept in `record_dir`, with its encoder built; None where there is none
    or its path no longer builds here (then the caller probes again)."""
    record = probe_record.load(record_dir, key)
    if record is None or record["chosen"] not in PATHS:
        return None
    try:
        built = PathEncoder(model, PATHS[record["chosen"]], device, graph_dir=record_dir)
    except (RuntimeError, ValueError) as e:
        log.warning(
            "encoder path %s, kept from an earlier probe, does not build (%s): probing again", record["chosen"], e
        )
        return None
    return ProbeResult(
        chosen=record["chosen"],
        forced=False,
        device=str(device),
        rows=record["rows"],
        measured=record["measured"],
        reused=True,
        built=built,
    )
