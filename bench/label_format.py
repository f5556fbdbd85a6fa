"""What a label answer costs to write and to read back, per file format (issue 13, responses).

A 512x512x100 uint8 label map (ct_abdomen_totalseg's 17-structure truth resampled by nearest neighbour, so the
organs and their boundaries are real, not noise) is encoded the way the server writes an infer result, and decoded
the way a client reads it: NIfTI gzip at several levels, NIfTI uncompressed, NRRD raw and gzip. Median of
--repeats runs per format.

    python bench/label_format.py [--out docs/results/label_format.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from grid import on_grid
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import md_table

from samora.data.volumes import GZIP_LEVEL, encode_nifti, save_label

SHAPE = (512, 512, 100)


def realistic_label(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """ct_abdomen_totalseg's truth resampled (nearest) onto a 512x512x100 grid, and that grid's affine."""
    labels, affine = on_grid(data / "ct_abdomen_totalseg" / "label.nii.gz", SHAPE)
    return labels.round().astype(np.uint8), affine


def nifti_gzip(level: int):
    """Writer of a NIfTI gzip at one compression level (the server's encoder, then gzip)."""

    def write(labels: np.ndarray, affine: np.ndarray, path: str) -> None:
        Path(path).write_bytes(gzip.compress(encode_nifti(labels, affine, compress=False), level, mtime=0))

    return write


def nrrd_writer(encoding: str):
    """Writer of an NRRD, raw or gzip (pynrrd)."""
    import nrrd

    def write(labels: np.ndarray, affine: np.ndarray, path: str) -> None:
        nrrd.write(path, labels, {"encoding": encoding, "space directions": affine[:3, :3].T})

    return write


def read_nifti(path: str) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def read_nrrd(path: str) -> np.ndarray:
    import nrrd

    return nrrd.read(path)[0]


# name: (suffix, memory layout of the map handed to the writer, writer, reader); "server" rows are
# samora.data.save_label itself (atomic write with fsync), as the infer tasks call it
FORMATS = {
    "NIfTI gzip 6, C-ordered map (before)": (".nii.gz", "C", nifti_gzip(6), read_nifti),
    f"NIfTI gzip {GZIP_LEVEL}, C-ordered map (server)": (".nii.gz", "C", save_label, read_nifti),
    f"NIfTI gzip {GZIP_LEVEL}, Fortran-ordered map (server now)": (".nii.gz", "F", save_label, read_nifti),
    "NIfTI gzip 6, Fortran-ordered map": (".nii.gz", "F", nifti_gzip(6), read_nifti),
    "NIfTI gzip 9, Fortran-ordered map": (".nii.gz", "F", nifti_gzip(9), read_nifti),
    "NIfTI uncompressed, Fortran-ordered map (server)": (".nii", "F", save_label, read_nifti),
    "NRRD raw, C-ordered map": (".nrrd", "C", nrrd_writer("raw"), read_nrrd),
    "NRRD gzip, C-ordered map": (".nrrd", "C", nrrd_writer("gzip"), read_nrrd),
}


def measure(labels: np.ndarray, affine: np.ndarray, repeats: int) -> dict[str, dict]:
    """Per format: median write and read seconds, file size, and that the read-back labels are identical."""
    rows = {}
    layouts = {"C": np.ascontiguousarray(labels), "F": np.asfortranarray(labels)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (suffix, layout, write, read) in FORMATS.items():
            path = os.path.join(tmp, "label" + suffix)
            writes, reads = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                write(layouts[layout], affine, path)
                writes.append(time.perf_counter() - start)
                start = time.perf_counter()
                back = read(path)
                reads.append(time.perf_counter() - start)
            rows[name] = {
                "write_s": statistics.median(writes),
                "read_s": statistics.median(reads),
                "bytes": os.path.getsize(path),
                "identical": bool(np.array_equal(back, labels)),
            }
    return rows


def render(record: dict) -> str:
    raw = record["raw_bytes"]
    table = md_table(
        ["format", "write (s)", "read (s)", "write + read (s)", "size (MB)", "size / raw", "read back identical"],
        [
            [
                name,
                f"{r['write_s']:.3f}",
                f"{r['read_s']:.3f}",
                f"{r['write_s'] + r['read_s']:.3f}",
                f"{r['bytes'] / 1e6:.2f}",
                f"{r['bytes'] / raw:.3f}",
                "yes" if r["identical"] else "NO",
            ]
            for name, r in record["formats"].items()
        ],
    )
    return (
        f"Label map {record['shape']} uint8 ({raw / 1e6:.1f} MB raw), {record['structures']} structures; median of "
        f"{record['repeats']} runs; load {record['load1_start']} -> {record['load1_end']}.\n\n{table}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/results/label_format.json"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    load_start = round(os.getloadavg()[0], 2)
    labels, affine = realistic_label(Path(args.data))
    record = {
        "benchmark": "label_format",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(1, 1),
        "shape": list(labels.shape),
        "structures": int(len(np.unique(labels)) - 1),
        "raw_bytes": int(labels.nbytes),
        "repeats": args.repeats,
        "load1_start": load_start,
        "formats": measure(labels, affine, args.repeats),
        "load1_end": round(os.getloadavg()[0], 2),
    }
    write_json(args.out, record)
    print(render(record))
    print(f"\ncommand: {record['command']}\nmachine: {record['machine']['cpu']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
