"""Accuracy guard of an encoder inference path: zero-shot protocol (a) of bench/zeroshot.py, fp32 against the path.

On ct_abdomen_totalseg, every organ's per-slice truth box is decoded on each slice that holds it (the app's prompt
path, LiteMedSAM's bundled weights, no training), once with the encoder in fp32 and once on the given path
(conf encoder_path). The guard of issue 13: every organ's whole-organ 3D Dice moves by <= 0.005.

    python bench/encoder_guard.py --path bf16 [--embedding-cache DIR] [--out docs]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from jobs import init_worker
from paths import DATA
from records import command_line, machine_info, now_utc, write_json
from report import PSEUDO_LABEL_NOTE, md_table
from zeroshot import EncodeClock, encode_slices, open_scan, organ_ids, per_slice, present_slices, read_names, scores

from samora.data.intensity import set_ct_window
from samora.serving.runtime import ModelRuntime
from samora.serving.settings import ENCODER_PATHS, AppSettings

SCAN = "ct_abdomen_totalseg"
MAX_DICE_DELTA = 0.005


def run_path(path: str, folder: Path, cache: Path | None, only: list[str] | None = None) -> dict:
    """Protocol (a) Dice per organ (all, or those named in `only`) with the encoder on `path`, and its encoding
    seconds per slice (only the slices holding those organs are encoded)."""
    settings = AppSettings(encoder_path=path)
    set_ct_window(settings.window())
    with tempfile.TemporaryDirectory(prefix="samora-guard-") as model_dir:
        runtime = ModelRuntime(settings, model_dir=model_dir)
        clock = EncodeClock(runtime, cache)
        scan = open_scan(runtime, clock, folder, settings.propagation_stability)
        chosen = [(i, n) for i, n in organ_ids(scan, read_names(folder), quick=False) if not only or n in only]
        holding = np.unique(np.concatenate([present_slices(scan.truth == i, scan.axis) for i, _ in chosen]))
        encode = encode_slices(scan, [int(k) for k in holding])
        organs = {}
        for organ_id, name in chosen:
            truth = scan.truth == organ_id
            pred, _ = per_slice(scan, truth)
            organs[name] = scores(scan, pred, truth)["dice"]
            print(f"  {path} {name}: {organs[name]:.4f}", flush=True)
        return {"path": runtime.encoder().path.name, "encode": encode, "dice": organs}


def compare(reference: dict, candidate: dict) -> dict:
    """Per-organ Dice of both runs, their difference, and whether the guard holds."""
    deltas = {name: candidate["dice"][name] - dice for name, dice in reference["dice"].items()}
    worst = max(abs(d) for d in deltas.values() if np.isfinite(d))
    return {"delta": deltas, "max_abs_delta": worst, "guard": MAX_DICE_DELTA, "passed": worst <= MAX_DICE_DELTA}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="bf16", choices=[p for p in ENCODER_PATHS if p != "auto"])
    parser.add_argument("--out", default="docs", help="writes OUT/results/encoder_guard_PATH.json")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embedding-cache", default=None, help="reuse embeddings across reruns (zeroshot.py's)")
    parser.add_argument("--organs", nargs="*", default=None, help="only these organs (default: every organ present)")
    args = parser.parse_args(argv)
    init_worker(args.threads)
    wall, load_start = time.perf_counter(), os.getloadavg()
    cache = Path(args.embedding_cache) if args.embedding_cache else None
    folder = Path(args.data) / SCAN
    runs = {name: run_path(name, folder, cache, args.organs) for name in ("fp32", args.path)}
    record = {
        "benchmark": "encoder_guard",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(1, args.threads),
        "scan": SCAN,
        "protocol": "a: per-slice truth box, mask = logits > 0, whole-organ 3D Dice",
        "organs": args.organs or "all present",
        "labels": PSEUDO_LABEL_NOTE,
        "runs": runs,
        **compare(runs["fp32"], runs[args.path]),
        "wall_s": time.perf_counter() - wall,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    }
    write_json(Path(args.out) / "results" / f"encoder_guard_{args.path}.json", record)
    rows = [
        [name, f"{dice:.4f}", f"{runs[args.path]['dice'][name]:.4f}", f"{record['delta'][name]:+.4f}"]
        for name, dice in runs["fp32"]["dice"].items()
    ]
    print(md_table(["organ", "Dice fp32", f"Dice {args.path}", "delta"], rows))
    seconds = {n: f"{r['encode']['seconds_per_slice']:.2f}" for n, r in runs.items()}
    verdict = "passed" if record["passed"] else "FAILED"
    print(f"max |delta| {record['max_abs_delta']:.4f} (guard {MAX_DICE_DELTA}): {verdict}")
    print(f"encode s/slice {seconds}; load {load_start} -> {os.getloadavg()}; command: {record['command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
