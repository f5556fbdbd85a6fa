"""Training throughput on 1 and N processes (torchrun, DDP; gloo on CPU, NCCL on GPUs): global slices per second of
an SSL expert (`samora pretrain --nproc N`) and of stage 2 in full mode (`samora finetune --nproc N`), same global
batch. Writes docs/results/distributed.json and prints a markdown table.

    python bench/distributed.py [--runs 1x2 1x1 2x1] [--steps 20] [--device cpu]   # processes x threads each
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import ROOT
from records import command_line, machine_info, now_utc, write_json
from report import md_table

from samora.data import PHANTOM_LABELS, write_phantom_studies

SIZE = 128


def _samora(args: list[str], threads: int) -> float:
    """Run a `samora` command with `threads` torch threads per process; wall seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "lib"), os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = str(threads)  # torchrun's ranks get cores / processes (samora.distributed.launch)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "samora.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def ssl_rate(studies: Path, out: Path, nproc: int, threads: int, steps: int, batch: int, device: str) -> float:
    """Slices/s of the pixel-level expert's loop (rank 0's timing of the steps, start-up excluded)."""
    _samora(["pretrain", "--studies", str(studies), "--out", str(out), "--image-size", str(SIZE), "--levels", "pixel",
             "--max-steps", str(steps), "--batch-size", str(batch), "--no-progress", "--device", device,
             "--nproc", str(nproc)], threads)  # fmt: skip
    return json.loads((out / "pretrain_summary.json").read_text())["levels"]["pixel"]["slices_per_second"]


def finetune_rate(studies: Path, out: Path, nproc: int, threads: int, epochs: int, batch: int, device: str) -> float:
    """Slices/s of stage 2 in full mode: slices trained over the epochs' time (evaluation included)."""
    _samora(["finetune", "--studies", str(studies), "--out", str(out), "--image-size", str(SIZE), "--mode", "full",
             "--labels", json.dumps(PHANTOM_LABELS), "--epochs", str(epochs), "--batch-size", str(batch),
             "--device", device, "--nproc", str(nproc)], threads)  # fmt: skip
    meta = json.loads(next((out / "versions").glob("v*/model.json")).read_text())
    history = meta["history"]
    slices = len(json.loads((out / "finetune_slices" / "case_ids.json").read_text())) * len(history)
    return round(slices / history[-1]["elapsed_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["1x2", "1x1", "2x1"],
        help="processes x torch threads per process (a process count above 1 gets cores / processes threads)",
    )
    parser.add_argument("--steps", type=int, default=20, help="SSL steps per run")
    parser.add_argument("--epochs", type=int, default=2, help="stage-2 epochs per run")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "distributed.json")
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="samora-bench-dist-") as tmp:
        studies = Path(tmp) / "studies"
        write_phantom_studies(studies, n_labeled=2, n_unlabeled=2, seed=3, shape=(128, 128, 32))
        for run in args.runs:
            n, threads = (int(v) for v in run.split("x"))
            shared = {
                "studies": studies,
                "nproc": n,
                "threads": threads,
                "batch": args.batch_size,
                "device": args.device,
            }
            ssl = ssl_rate(out=Path(tmp) / f"ssl{run}", steps=args.steps, **shared)
            stage2 = finetune_rate(out=Path(tmp) / f"ft{run}", epochs=args.epochs, **shared)
            row = {"processes": n, "threads_per_process": threads, "ssl_slices_per_s": ssl}
            rows.append({**row, "finetune_full_slices_per_s": stage2})
            print(f"{n} process(es) x {threads} thread(s): SSL {ssl} slices/s, stage 2 {stage2} slices/s", flush=True)
    record = {
        "date": now_utc(),
        "command": command_line(),
        "machine": machine_info(workers=max(r["processes"] for r in rows), threads=rows[-1]["threads_per_process"]),
        "setup": {
            "preset": "tiny",
            "image_size": SIZE,
            "global_batch": args.batch_size,
            "device": args.device,
            "ssl_level": "pixel",
            "ssl_steps": args.steps,
            "finetune_epochs": args.epochs,
            "data": "4 synthetic phantom CTs 128x128x32 (2 labelled)",
        },
        "rows": rows,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    write_json(args.out, record)
    print(render_markdown(record))
    print(f"written {args.out}")


def render_markdown(record: dict) -> str:
    """The benchmarks.md section of a distributed.json record."""
    machine, setup = record["machine"], record["setup"]
    table = [
        [r["processes"], r["threads_per_process"], r["ssl_slices_per_s"], r["finetune_full_slices_per_s"]]
        for r in record["rows"]
    ]
    return "\n".join(
        [
            "## 8. Several training processes (torchrun, DDP)",
            "",
            f"`{record['command']}` on {machine['cpu']}, {machine['cpu_cores_usable']} usable CPU cores, torch "
            f"{machine['torch']}, {record['date']}. GPU: {machine['gpu']}. Global batch {setup['global_batch']} split "
            f"over the processes (gloo on CPU), `{setup['preset']}` "
            f"preset at {setup['image_size']} px, {setup['data']}. SSL: the {setup['ssl_level']} expert, "
            f"{setup['ssl_steps']} steps (rank 0's loop time). Stage 2: `full` mode, {setup['finetune_epochs']} "
            "epochs (training slices over the epochs' time, evaluation included).",
            "",
            md_table(["processes", "torch threads each", "SSL slices/s", "stage 2 full slices/s"], table),
            "",
            f"Load average (1 min) {record['load_average_1min']['before']} before, "
            f"{record['load_average_1min']['after']} after (above ~2 on this machine, other jobs shared the cores).",
            _comparison(record["rows"]),
            "On CPU cores the ranks share the cores one process could fill, and each step adds a gradient all-reduce "
            "and (stage 2) an output gather over gloo; the multi-process path is meant for one process per GPU. "
            "No GPU was lent for this measurement, so GPU rows are not measured.",
            "",
        ]
    )


def _comparison(rows: list[dict]) -> str:
    """What the rows measured: the most processes against the best single process, per stage."""
    many = max(rows, key=lambda r: r["processes"])
    single = [r for r in rows if r["processes"] == 1]
    if many["processes"] == 1 or not single:
        return ""
    ratios = []
    for key, stage in (("ssl_slices_per_s", "SSL"), ("finetune_full_slices_per_s", "stage 2")):
        best = max(single, key=lambda r: r[key])
        ratio = many[key] / best[key]
        ratios.append(f"{stage} {ratio:.2f}x of 1 process x {best['threads_per_process']} threads")
    return f"Measured: {many['processes']} processes reach " + ", ".join(ratios) + "."


if __name__ == "__main__":
    main()
