"""Peak memory of SSL pretraining against the number of studies: slices stream from the on-disk slice cache, so
50 studies should need about the memory of 5. The 50 are slab/flip variants of 5 synthetic phantom CTs. Each run is
a fresh `samora pretrain` process (cache build + a few pixel-level steps); its peak RSS is read from the kernel.
Writes docs/results/ssl_memory.json.

    python bench/ssl_memory.py [--studies 5 50] [--steps 20] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_MEASURE = (
    "import resource, sys; from samora.cli import main; rc = main(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def make_variants(sources: list[Path], n: int, out: Path) -> list[Path]:
    """`n` studies from `sources`: copy k of a source drops k % 4 slices at each end of z and flips along
    x when k is odd, so that every study (and its slices) differs."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        k, source = divmod(i, len(sources))
        image = nib.load(str(sources[source]))
        data = np.asarray(image.dataobj)
        cut = k % 4
        data = data[:, :, cut : data.shape[2] - cut]
        data = data[::-1] if k % 2 else data
        path = out / f"study_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), image.affine), str(path))
        written.append(path)
    return written


def peak_rss_mb(studies: Path, out: Path, steps: int, size: int, batch: int = 8) -> float:
    """Peak RSS (MB) of one `samora pretrain` process on `studies` (pixel level, `steps` steps)."""
    args = ["pretrain", "--studies", str(studies), "--out", str(out), "--image-size", str(size)]
    args += ["--levels", "pixel", "--max-steps", str(steps), "--batch-size", str(batch), "--no-progress"]
    args += ["--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "lib"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], env=env, check=True, capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def compare(counts: list[int], work: Path, steps: int, size: int, shape=(128, 128, 48)) -> dict[int, float]:
    """Peak RSS per study count, all from the same 5 synthetic sources."""
    from samora.data import write_phantom_studies

    write_phantom_studies(work / "sources", n_labeled=0, n_unlabeled=5, seed=7, shape=shape)
    sources = sorted((work / "sources").glob("*.nii.gz"))
    return {n: peak_rss_mb(_variants(sources, n, work), work / f"out{n}", steps, size) for n in counts}


def _variants(sources: list[Path], n: int, work: Path) -> Path:
    make_variants(sources, n, work / f"studies{n}")
    return work / f"studies{n}"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from records import command_line, machine_info, now_utc, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "ssl_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="samora-bench-mem-") as tmp:
        peaks = compare(args.studies, Path(tmp), args.steps, args.size)
    for n, mb in peaks.items():
        print(f"{n} studies: peak RSS {mb:.0f} MB")
    low, high = peaks[min(peaks)], peaks[max(peaks)]
    print(f"difference {100 * (high - low) / low:+.1f}% ({max(peaks)} vs {min(peaks)} studies)")
    write_json(
        args.out,
        {
            "date": now_utc(),
            "command": command_line(),
            "machine": machine_info(workers=1, threads=0),
            "setup": {
                "preset": "tiny",
                "image_size": args.size,
                "level": "pixel",
                "steps": args.steps,
                "batch": 8,
                "studies": "slab/flip variants of 5 synthetic phantom CTs 128x128x48",
            },
            "peak_rss_mb": {str(n): round(mb, 1) for n, mb in peaks.items()},
            "relative_difference": round((high - low) / low, 4),
        },
    )


def render_markdown(record: dict) -> str:
    """The benchmarks.md lines of an ssl_memory.json record."""
    peaks = record["peak_rss_mb"]
    counts = ", ".join(f"{n} studies {mb:.0f} MB" for n, mb in peaks.items())
    return "\n".join(
        [
            "### 8.1 SSL memory against the number of studies",
            "",
            f"`{record['command']}` ({record['date']}): peak RSS of one `samora pretrain` process (slice-cache build "
            f"+ {record['setup']['steps']} pixel-level steps at {record['setup']['image_size']} px), "
            f"{record['setup']['studies']}: {counts}; difference {100 * record['relative_difference']:+.1f}%. "
            "Slices stream from the memory-mapped cache, so the dataset's size hardly shows; most of the peak is "
            "torch, MONAI and the model.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
