"""Shared helpers of the benchmark scripts: machine/command records, JSON, tables, plots, model builders (SAMora
variants and the MONAI UNet baseline) and the stage-1 SSL runs they share. Job running lives in jobs.py."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from baselines import UNetModel

from samora.io_utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_WORK = ROOT / "runs" / "bench"
PSEUDO_LABEL_NOTE = (
    "The ct_abdomen_totalseg labels are TotalSegmentator PSEUDO-labels (model output, not manual annotation): "
    "every Dice/HD95 here measures agreement with that model, not with a radiologist."
)
RANDOM_BACKBONE_NOTE = (
    "The SAM backbone is the `tiny` preset (4 blocks, width 96) with RANDOM weights: no SAM checkpoint can be "
    "downloaded on this machine. Absolute numbers are therefore far below published SAM results and say nothing about "
    "a real SAM; pass --checkpoint sam_vit_b_01ec64.pth (with --preset vit_b) to run the same protocol on real weights."
)


# ----- records ----------------------------------------------------------------------------------------------------


def machine_info(workers: int, threads: int) -> dict[str, Any]:
    """The machine and software the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import monai

    import samora

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none: GPU rows not measured (no GPU lent)"
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_cores_visible": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "workers": workers,
        "torch_threads_per_worker": threads,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "samora": samora.__version__,
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, relative to the project root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", script_text, *(shlex.quote(a) for a in argv[1:])])


def now_utc() -> str:
    """ISO date-time in UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def json_safe(obj: Any) -> Any:
    """Plain JSON: NaN -> null, +-inf -> "inf"/"-inf", numpy scalars/arrays -> Python values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(obj, Path):
        return str(obj)
    return obj


def as_float(value: Any) -> float:
    """Inverse of json_safe for numbers: null -> NaN, "inf" -> inf."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return float(value)
    return float(value)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` (made JSON-safe) atomically, keys in their order (tables follow it); returns the path."""
    return atomic_write_json(path, json_safe(data), sort_keys=False)


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


# ----- statistics and formatting ---------------------------------------------------------------------------------


def finite(values: Iterable[Any]) -> list[float]:
    """The finite values among `values` (None, NaN, inf dropped)."""
    out = []
    for v in values:
        f = as_float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the finite values; NaN, NaN if none."""
    vals = finite(values)
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals))


def fmt_ms(values: Sequence[Any], digits: int = 3, missed_word: str = "missed") -> str:
    """'mean ± std' over seeds; infinite values (empty predictions) are counted and named, not averaged."""
    values = list(values)
    if not values:
        return "-"
    n_inf = sum(1 for v in values if math.isinf(as_float(v)))
    mean, std = mean_std(values)
    if math.isnan(mean):
        return f"{missed_word} ({n_inf}/{len(values)})" if n_inf else "-"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
    if n_inf:
        text += f" ({missed_word} {n_inf}/{len(values)})"
    return text


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


# ----- plots -----------------------------------------------------------------------------------------------------


def plot_lines(
    series: dict[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    out_png: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
    xticks: Sequence[float] | None = None,
    xticklabels: Sequence[str] | None = None,
    logx: bool = False,
) -> Path:
    """One line per series: x and a list of per-seed y lists; the mean is drawn with a +-1 std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (x, ys) in series.items():
        arr = np.array([[as_float(v) for v in y] for y in ys], dtype=float)
        if arr.size == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(arr, axis=0), np.nanstd(arr, axis=0)
        line = ax.plot(x, mean, marker="o", markersize=3, linewidth=1.6, label=name)[0]
        if arr.shape[0] > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="bottom", color="grey")
    if logx:
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks))
        if xticklabels is not None:
            ax.set_xticklabels(list(xticklabels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


# ----- models ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A compared configuration: a SAMora model variant or the UNet baseline."""

    key: str
    title: str
    kind: str = "sam"  # "sam", "unet", "segresnet" (baselines from scratch) or "zeroshot" (box prompts, no training)
    decoder: str = "samed"
    fusion: str = "reduced"
    finetune_experts: bool = False
    ssl: bool = False
    train_mode: str = "full"  # samora.engine.train.TRAIN_MODES: "cached" trains heads on frozen-encoder embeddings


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("samed", "(a) SAMed-style LoRA, no SSL", fusion="image", finetune_experts=True),
        Method("samora", "(b) SAMora: SSL experts + HL-Attn (reduced)", fusion="reduced", ssl=True),
        Method(
            "samora_ft",
            "(b') SAMora, experts also fine-tuned (app default on a random backbone)",
            fusion="reduced",
            finetune_experts=True,
            ssl=True,
        ),
        Method("samora_sum", "(c) SAMora, sum fusion", fusion="sum", ssl=True),
        Method("expert_image", "(d) image expert alone (SSL)", fusion="image", ssl=True),
        Method("expert_patch", "(d) patch expert alone (SSL)", fusion="patch", ssl=True),
        Method("expert_pixel", "(d) pixel expert alone (SSL)", fusion="pixel", ssl=True),
        Method(
            "hsam",
            "(e) H-SAM decoder, no SSL (SAMed-style LoRA)",
            decoder="hsam",
            fusion="image",
            finetune_experts=True,
        ),
        Method("hsam_ssl", "(e) H-SAM decoder + SSL experts + HL-Attn", decoder="hsam", fusion="reduced", ssl=True),
        Method("unet", "(f) MONAI 2D UNet from scratch", kind="unet"),
        Method("segresnet", "(f) MONAI 2D SegResNet from scratch", kind="segresnet"),
        Method(
            "heads",
            "(g) prompt-free heads on the frozen encoder, no experts (cached)",
            fusion="image",
            train_mode="cached",
        ),
        # HL-Attn starts as an exact no-op and the cached mode never trains it, so the cheap mode's experts can
        # only act through the plain sum of their residuals
        Method(
            "samora_cached",
            "(h) SAMora cheap mode: frozen SSL experts (sum), heads on cached embeddings",
            fusion="sum",
            ssl=True,
            train_mode="cached",
        ),
        Method(
            "zeroshot",
            "(r) zero-shot box prompt from each test slice's truth (reference, not prompt-free)",
            kind="zeroshot",
        ),
    )
}


def build_model(
    method: Method,
    labels: dict[str, int],
    image_size: int,
    seed: int,
    preset: str = "tiny",
    checkpoint: str | None = None,
    experts_dir: str | Path | None = None,
) -> torch.nn.Module:
    """A fresh model for `method` (backbone and new heads seeded by `seed`), SSL experts loaded where it uses them."""
    if method.kind in ("unet", "segresnet"):
        return UNetModel(labels, image_size, seed, arch=method.kind)
    from samora.config import ModelConfig
    from samora.model import SamoraModel
    from samora.ssl.experts_io import load_experts

    config = ModelConfig(
        preset=preset,
        image_size=image_size,
        checkpoint=checkpoint,
        labels=dict(labels),
        decoder=method.decoder,
        fusion=method.fusion,
        finetune_experts=method.finetune_experts,
        prompt_head=False,
        init_seed=seed,
    )
    model = SamoraModel(config)
    if method.ssl:
        if experts_dir is None:
            raise ValueError(f"method {method.key} needs SSL experts")
        load_experts(model, experts_dir)
    return model


def trainable_count(model: torch.nn.Module, train_mode: str = "full") -> int:
    """Number of parameters stage 2 trains for this model in `train_mode`."""
    model.set_stage("finetune-heads" if train_mode == "cached" else "finetune")
    count = sum(p.numel() for p in model.trainable_parameters())
    model.set_stage("inference")
    return int(count)


def finetune_config(
    steps: int,
    n_slices: int,
    batch_size: int,
    lr: float,
    seed: int,
    mode: str = "full",
    embedding_dir: str | None = None,
    device: str = "cpu",
):
    """Stage-2 settings with a fixed optimiser-step budget (independent of how many slices are labelled).

    No augmentation and no prompt-path training: identical for every method, and MONAI's per-sample affine
    augmentation would cost more CPU time than the tiny model's training step.
    """
    from samora.engine.train import FinetuneConfig

    per_epoch = max(1, math.ceil(n_slices / batch_size))
    return FinetuneConfig(
        epochs=math.ceil(steps / per_epoch),
        batch_size=batch_size,
        lr=lr,
        max_steps=steps,
        augment=False,
        prompt_training=False,
        seed=seed,
        mode=mode,
        embedding_dir=embedding_dir,
        device=device,
    )


# ----- self-supervised experts (shared by the few-shot and active-learning benchmarks) --------------------------


@dataclass(frozen=True)
class SSLSpec:
    """Stage-1 settings; the experts of one seed are trained once and reused by every SAMora variant."""

    preset: str
    image_size: int
    steps: int
    batch_size: int
    checkpoint: str | None = None
    lr: float = 1e-3
    studies: tuple[str, ...] = field(default_factory=tuple)
    window_hu: tuple[float, float] = (-125.0, 275.0)

    def tag(self) -> str:
        """Folder-name signature (experts of another configuration are never picked up by mistake)."""
        ckpt = f"_{Path(self.checkpoint).stem}" if self.checkpoint else ""
        return f"{self.preset}{ckpt}_S{self.image_size}_steps{self.steps}_bs{self.batch_size}{self.window_tag()}"

    def window_tag(self) -> str:
        """'' for the abdominal window (earlier folders stay valid), else the window in HU."""
        low, high = self.window_hu
        return "" if (low, high) == (-125.0, 275.0) else f"_w{low:g}_{high:g}"


def ssl_studies(data: Path = DATA) -> list[Path]:
    """Unlabelled CT images used for SSL: all slices of the abdomen study (its image only) and the other CT scans."""
    paths = [
        data / "ct_abdomen_totalseg" / "image.nii.gz",
        data / "ct_chest_totalseg" / "aorta_crop.nii.gz",
        data / "ct_chest_totalseg" / "pulmonary_crop.nii.gz",
        data / "ct_pelvis_deeplesion" / "image.nii.gz",
        data / "ct_3slice_dcmqi" / "image.nii.gz",
    ]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"SSL studies missing: {missing} (set SAMORA_SHARED_DATA)")
    return paths


def ssl_cache_dir(work: Path, spec: SSLSpec) -> Path:
    """Where the preprocessed SSL slices live (shared by all seeds)."""
    return Path(work) / f"ssl_cache_S{spec.image_size}{spec.window_tag()}"


def ssl_dir(work: Path, spec: SSLSpec, seed: int) -> Path:
    """Where the experts of `seed` live."""
    return Path(work) / f"ssl_{spec.tag()}_seed{seed}"


def build_ssl_cache(work: Path, spec: SSLSpec) -> dict[str, Any]:
    """Build (or reuse) the slice cache in this process, before workers read it; returns a short description."""
    from samora.data import IntensityWindow, SliceCache

    cache = SliceCache.build(
        [Path(s) for s in spec.studies],
        ssl_cache_dir(work, spec),
        size=spec.image_size,
        context="single",
        window=IntensityWindow("hu", *spec.window_hu),
        progress=False,
    )
    per_study = {r["id"]: len(r["slices"]) for r in cache.index["studies"]}
    return {"slices": len(cache), "per_study": per_study, "window_hu": list(spec.window_hu)}


def run_ssl_job(work: str, spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train (or reuse) the three experts of one seed; the backbone is the one `build_model(seed=seed)` makes."""
    from samora.config import ModelConfig, SSLSettings
    from samora.ssl.pretraining import pretrain

    spec_obj = SSLSpec(**{**spec, "studies": tuple(spec["studies"]), "window_hu": tuple(spec["window_hu"])})
    config = ModelConfig(
        preset=spec_obj.preset,
        image_size=spec_obj.image_size,
        checkpoint=spec_obj.checkpoint,
        prompt_head=False,
        init_seed=seed,
    )
    start = time.perf_counter()
    summaries = pretrain(
        str(ssl_cache_dir(Path(work), spec_obj)),
        ssl_dir(Path(work), spec_obj, seed),
        config,
        SSLSettings(batch_size=spec_obj.batch_size, lr=spec_obj.lr, seed=seed, checkpoint_every=10**9),
        max_steps=spec_obj.steps,
        progress=False,
        log=lambda _msg: None,
    )
    return {
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "levels": {
            level: {k: s.get(k) for k in ("status", "steps", "first_loss", "final_loss", "seconds")}
            for level, s in summaries.items()
        },
        "dir": str(ssl_dir(Path(work), spec_obj, seed)),
    }


def spec_dict(spec: SSLSpec) -> dict[str, Any]:
    """SSLSpec as picklable/JSON-able kwargs."""
    data = asdict(spec)
    data["studies"] = [str(s) for s in spec.studies]
    data["window_hu"] = list(spec.window_hu)
    return data


def preset_for(checkpoint: str | None, preset: str | None) -> str:
    """The backbone preset: as given, else read from an official checkpoint name, else 'tiny'."""
    if preset:
        return preset
    if checkpoint:
        name = Path(checkpoint).name
        for candidate in ("vit_b", "vit_l", "vit_h"):
            if candidate in name:
                return candidate
        raise SystemExit(f"cannot tell the preset of {checkpoint}; pass --preset vit_b|vit_l|vit_h")
    return "tiny"


def add_common_args(parser: Any) -> None:
    """Options every benchmark script shares."""
    parser.add_argument("--quick", action="store_true", help="minutes-long smoke version (CI)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="docs folder: results/<name>.json and PNG plots")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="scratch folder (SSL experts, caches)")
    parser.add_argument("--checkpoint", default=None, help="official SAM checkpoint (default: random backbone)")
    parser.add_argument("--preset", default=None, help="backbone preset (default tiny, or from --checkpoint's name)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")


def header_lines(record: dict[str, Any]) -> list[str]:
    """Command, machine and date lines printed by every script."""
    m = record["machine"]
    return [
        f"command: {record['command']}",
        f"date: {record['date']}",
        f"machine: {m['cpu']} ({m['cpu_cores_usable']} usable cores), {m['workers']} workers x "
        f"{m['torch_threads_per_worker']} torch thread(s), torch {m['torch']}, {m['platform']}; GPU: {m['gpu']}",
        f"wall time: {record.get('wall_s', math.nan):.0f} s",
    ]
