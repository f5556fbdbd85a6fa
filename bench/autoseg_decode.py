"""The decode part of auto-segmentation alone, per decode batch size (issue 13).

Every slice gets the same fixed stand-in embedding, so the encoder never runs: what is timed is LiteMedSAM's
prompt-free head over the 17 organs + background, the resizing of the class probabilities back onto the slice grid,
and the argmax and entropy over classes. Prints the command, the machine and one row per batch size.

    python bench/autoseg_decode.py [--batches 1 2 4 8] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import md_table

from samora.config import ModelConfig
from samora.data import load_volume
from samora.engine.inference import segment_volume
from samora.model import SamoraModel

ORGANS = 17  # the app's default CT label set


class StandInEmbeddings:
    """An embedding store whose every slice is already "cached" as one fixed random embedding."""

    def __init__(self, channels: int = 256, grid: int = 64) -> None:
        rng = np.random.default_rng(0)
        self.embedding = rng.standard_normal((1, channels, grid, grid)).astype(np.float16)

    def embed(self, model, images, batch_size=1, device="cpu", on_progress=None) -> np.ndarray:
        return np.repeat(self.embedding, len(images), axis=0)


def time_batches(volume, batches: list[int], repeats: int) -> list[dict]:
    """Seconds of each repeat per decode batch size, with the labels' checksum (equal across batch sizes)."""
    labels = {f"organ_{i}": i for i in range(1, ORGANS + 1)}
    model = SamoraModel(ModelConfig(preset="litemedsam", image_size=256, labels=labels)).eval()
    rows = []
    for batch in batches:
        seconds, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = segment_volume(
                model, volume, batch_size=batch, encode_batch_size=1, embeddings=StandInEmbeddings()
            )
            seconds.append(time.perf_counter() - start)
        checksum = int(result.labels.astype(np.int64).sum())
        rows.append({"batch": batch, "seconds": seconds, "labels_checksum": checksum, "entropy": result.mean_entropy})
        print(f"  batch {batch}: {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default=str(DATA / "ct_abdomen_totalseg" / "image.nii.gz"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the record here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"benchmark": "autoseg_decode", "command": command_line(), "date": now_utc()}
    record["machine"] = machine_info(1, args.threads)
    print(f"command: {record['command']}\nmachine: {record['machine']}", flush=True)
    volume = load_volume(args.volume)
    record["slices"] = volume.shape[volume.axial_axis]
    record["rows"] = time_batches(volume, args.batches, args.repeats)
    if args.out:
        write_json(Path(args.out), record)
    table = [[r["batch"], ", ".join(f"{s:.2f}" for s in r["seconds"]), r["labels_checksum"]] for r in record["rows"]]
    print(md_table(["decode batch", "seconds per run", "labels checksum"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
