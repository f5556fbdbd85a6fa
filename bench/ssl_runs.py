"""Stage-1 self-supervised runs shared by the few-shot and active-learning benchmarks: the settings, where the slice
cache and each seed's experts live, and the job that trains (or reuses) them."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs import Job
from paths import DATA

ABDOMEN_WINDOW_HU = (-125.0, 275.0)  # the SSL slices' default CT window (the folder names leave it out)


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
    window_hu: tuple[float, float] = ABDOMEN_WINDOW_HU
    precision: str = "fp32"  # samora.engine.precision.TRAIN_PRECISIONS

    def tag(self) -> str:
        """Folder-name signature (experts of another configuration are never picked up by mistake)."""
        ckpt = f"_{Path(self.checkpoint).stem}" if self.checkpoint else ""
        # fp32 leaves the name as it was, so that earlier folders stay valid
        precision = "" if self.precision == "fp32" else f"_{self.precision}"
        size = f"_S{self.image_size}_steps{self.steps}_bs{self.batch_size}"
        return f"{self.preset}{ckpt}{size}{self.window_tag()}{precision}"

    def window_tag(self) -> str:
        """'' for the abdominal window (earlier folders stay valid), else the window in HU."""
        low, high = self.window_hu
        return "" if (low, high) == ABDOMEN_WINDOW_HU else f"_w{low:g}_{high:g}"


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


def ssl_spec_for(
    settings: dict[str, Any],
    *,
    preset: str,
    checkpoint: str | None,
    data: str | Path,
    window_hu: tuple[float, float] = ABDOMEN_WINDOW_HU,
) -> SSLSpec:
    """A benchmark's stage-1 spec: its input size, `ssl_steps` and `ssl_batch_size` from `settings`, the SSL studies
    of the shared data folder `data`."""
    return SSLSpec(
        preset=preset,
        image_size=settings["image_size"],
        steps=settings["ssl_steps"],
        batch_size=settings["ssl_batch_size"],
        checkpoint=checkpoint,
        studies=tuple(str(p) for p in ssl_studies(Path(data))),
        window_hu=window_hu,
    )


def ssl_job(key: str, work: Path, spec: SSLSpec, seed: int) -> Job:
    """The job that trains (or reuses) the experts of `seed`, started before every other job."""
    return Job(key=key, fn=run_ssl_job, kwargs={"work": str(work), "spec": spec_dict(spec), "seed": seed}, cost=1e6)


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
    from samora.ssl.trainer import SILENT

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
        SSLSettings(
            batch_size=spec_obj.batch_size,
            lr=spec_obj.lr,
            seed=seed,
            checkpoint_every=10**9,
            precision=spec_obj.precision,
        ),
        max_steps=spec_obj.steps,
        hooks=SILENT,
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


def without_missing_experts(done: dict[str, dict], jobs: list[Job], folders: dict[str, str]) -> dict[str, dict]:
    """The journal's finished jobs less the SSL jobs (key -> experts folder in `folders`) whose experts are not on
    this machine although a job still to run waits for them: a fresh clone holds the journal, not the work folder,
    so those SSL runs train again. Where nothing left needs them they stay done."""
    from samora.ssl.pretraining import SUMMARY_FILE

    needed = {after for job in jobs if job.key not in done for after in job.after}
    kept = dict(done)
    for key in [k for k in done if k in folders and k in needed]:
        folder = Path(folders[key])
        if not (folder / SUMMARY_FILE).exists():
            print(f"{key} is in the journal but its experts are not in {folder}; training them again", flush=True)
            del kept[key]
    return kept
