"""Run every benchmark and write docs/benchmarks.md (tables, plots, exact commands, machine, date, seeds).

    python bench/run_all.py [--quick] [--checkpoint SAM.pth [--preset vit_b]] [--out docs/]

Sections, each its own script and JSON file in OUT/results/: speed and memory (bench/speed.py), few-shot quality
on real CT (bench/fewshot.py), fine-tuning efficiency (bench/efficiency.py, from the few-shot curves) and an
active-learning simulation (bench/active_learning.py), plus (default set only) a load test during training and a
reference for how far stage 1's masked-image-modelling loss can fall (bench/mim_reference.py). The default set is
sized for about 45-60 minutes on 2 CPU cores; --quick is a smoke run of a few minutes whose numbers mean nothing.
The report's fixed prose is bench/report_template.md; the sentences computed from the numbers are in
bench/summary.py. --report-only rewrites benchmarks.md from the JSON files of an earlier run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import active_learning
import distributed
import efficiency
import fewshot
import mim_reference
import real_summary
import ssl_memory
import summary
from paths import ROOT
from records import command_line, machine_info, now_utc, read_json, write_json
from report import PSEUDO_LABEL_NOTE, RANDOM_BACKBONE_NOTE, fill, md_table
from stats import as_float, mean_std

BENCH = Path(__file__).resolve().parent


def run_stage(name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one benchmark script, echoing and logging its output; raise if it fails."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    cpu_before = _children_cpu()
    load_before = os.getloadavg()
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if not line.startswith(("|", "<", "!")):  # tables are in the report; keep the console readable
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{name} failed with exit status {rc}; see {log_path}")
    cpu = _children_cpu() - cpu_before
    print(f"=== {name}: done in {seconds:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return {
        "name": name,
        "command": " ".join(["python", *[_rel(c) for c in cmd[1:]]]),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


def _children_cpu() -> float:
    """User + system CPU seconds of all finished child processes (and their waited-for children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(ROOT)) if Path(arg).exists() else arg
    except ValueError:
        return arg


def speed_markdown(record: dict) -> str:
    """The speed section from bench/speed.py's JSON (its own tables)."""
    from speed import markdown

    m = record["machine"]
    return (
        fill(
            "speed",
            command=record["command"],
            platform=m.get("platform", ""),
            device=m.get("device", "cpu"),
            date=record["date"],
            tables=markdown(record),
        )
        + "\n"
    )


def load_markdown(record: dict) -> str:
    """Load-test figures (tests/test_load.py against a real server while a training run is in progress)."""
    headers = ["requests", "clients", "failures", "p50 latency s", "p95 latency s", "wall s", "training still running"]
    row = [
        record["requests"],
        record["clients"],
        record["failures"],
        f"{record['p50_s']:.2f}",
        f"{record['p95_s']:.2f}",
        f"{record['wall_s']:.1f}",
        record["training_running_at_end"],
    ]
    return fill("load", record, table=md_table(headers, [row])) + "\n"


def head_markdown(
    *,
    stages: list[dict],
    args: argparse.Namespace,
    wall: float,
    machine: dict,
    previous: dict | None,
    reading: list[str],
    real_weights: str = "",
) -> str:
    """Title, machine, stages and the honest summary (`previous`: the run_all.json of the run being reported)."""
    rows = "".join(
        f"\n| {s['name']} | `{s['command']}` | {s['seconds'] / 60:.1f} min | {s['cpu_seconds'] / 60:.1f} min | "
        f"{s['load_average_before'][0]:.1f} -> {s['load_average_after'][0]:.1f} |"
        for s in stages
    )
    cpu_total = sum(s["cpu_seconds"] for s in stages)
    return fill(
        "head",
        machine,
        command=previous["command"] if previous else command_line(),
        quick_note=" (QUICK smoke run: the numbers mean nothing)" if (previous or {}).get("quick", args.quick) else "",
        date=previous["date"] if previous else now_utc(),
        wall_min=f"{wall / 60:.1f}",
        backbone=f"`{args.checkpoint}`." if args.checkpoint else "random-initialised `tiny` preset.",
        stage_rows=rows,
        cpu_min=f"{cpu_total / 60:.1f}",
        cpu_wall_min=f"{cpu_total / 120:.1f}",
        reading="".join(f"\n- {line}" for line in reading),
        real_weights=f"\n{real_weights}" if real_weights else "",
        pseudo_label_note=PSEUDO_LABEL_NOTE,
        random_backbone_note=RANDOM_BACKBONE_NOTE,
    )


def _read(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def compose(
    *, out: Path, stages: list[dict], args: argparse.Namespace, wall: float, machine: dict, previous: dict | None = None
) -> str:
    """docs/benchmarks.md (`previous`: the run_all.json of the run being reported, for --report-only)."""
    results = out / "results"
    few, eff, al = (_read(results / f"{name}.json") for name in ("fewshot", "efficiency", "active_learning"))
    head = head_markdown(
        stages=stages,
        args=args,
        wall=wall,
        machine=machine,
        previous=previous,
        reading=summary.reading(few, eff, al),
        real_weights=real_summary.render(results),  # the pretrained encoder's answers lead, when their records exist
    )
    lines = [head, ""]
    if few:
        lines += [fewshot.render_markdown(few), f"Seeds: {few['settings']['seeds']}. Command: `{few['command']}`.", ""]
    if eff:
        lines += [efficiency.render_markdown(eff), ""]
    if al:
        run_date = al.get("date", "date not recorded")
        lines += [active_learning.render_markdown(al), f"Command: `{al['command']}` ({run_date}).", ""]
    sections = (
        ("speed", speed_markdown),
        ("load", load_markdown),
        ("mim_reference", mim_reference.render_markdown),
        ("distributed", distributed.render_markdown),
        ("ssl_memory", ssl_memory.render_markdown),
    )
    for name, render in sections:
        record = _read(results / f"{name}.json")
        if record:
            lines.append(render(record))
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (a few minutes)")
    parser.add_argument("--checkpoint", default=None, help="official SAM checkpoint (default: random backbone)")
    parser.add_argument("--preset", default=None, help="backbone preset for --checkpoint (default from its name)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for benchmarks.md, PNGs and results/")
    parser.add_argument("--work", default=None, help="scratch folder (default: a fresh temporary folder)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only", nargs="+", default=None, choices=["speed", "fewshot", "efficiency", "al", "load", "mim"]
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite benchmarks.md from the JSON files of an earlier run"
    )
    return parser


def plan_stages(args: argparse.Namespace, out: Path, work: Path) -> list[tuple[str, list[str], dict | None]]:
    """(name, command, extra environment) of each benchmark script the run executes, in order."""
    py = sys.executable
    shared = ["--out", str(out), "--work", str(work), "--workers", str(args.workers), "--threads", str(args.threads)]
    if args.quick:
        shared.append("--quick")
    if args.checkpoint:
        shared += ["--checkpoint", args.checkpoint]
    if args.preset:
        shared += ["--preset", args.preset]
    speed_cmd = [py, str(BENCH / "speed.py"), "--out", str(out / "results" / "speed.json")]
    if args.quick:
        speed_cmd.append("--quick")
    if args.checkpoint:
        speed_cmd += ["--checkpoint", args.checkpoint]
    plan = [
        ("fewshot", [py, str(BENCH / "fewshot.py"), *shared], None),
        ("efficiency", [py, str(BENCH / "efficiency.py"), *shared], None),
        ("al", [py, str(BENCH / "active_learning.py"), *shared], None),
        ("speed", speed_cmd, None),
    ]
    if not args.quick:  # a real server under load; CI runs the same test in its suite
        load_cmd = [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_load.py", "-k", "concurrent"]
        plan.append(("load", load_cmd, {"SAMORA_LOAD_REPORT": str(out / "results" / "load.json")}))
        mim_cmd = [py, str(BENCH / "mim_reference.py"), "--out", str(out / "results" / "mim_reference.json")]
        plan.append(("mim", mim_cmd, None))
    return [stage for stage in plan if not args.only or stage[0] in args.only]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wall = time.perf_counter()
    out = Path(args.out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        previous = read_json(out / "results" / "run_all.json")
        (out / "benchmarks.md").write_text(
            compose(
                out=out,
                stages=previous["stages"],
                args=args,
                wall=previous["wall_s"],
                machine=previous["machine"],
                previous=previous,
            )
        )
        print(f"rewrote {out / 'benchmarks.md'} from {out / 'results'}")
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="samora-bench-"))
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stages = []
    try:
        for name, cmd, env in plan_stages(args, out, work):
            stages.append(run_stage(name, cmd, log_dir, env))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - wall
    machine = machine_info(args.workers, args.threads)
    write_json(
        out / "results" / "run_all.json",
        {
            "command": command_line(),
            "date": now_utc(),
            "machine": machine,
            "quick": args.quick,
            "stages": stages,
            "wall_s": elapsed,
        },
    )
    (out / "benchmarks.md").write_text(compose(out=out, stages=stages, args=args, wall=elapsed, machine=machine))
    few = out / "results" / "fewshot.json"
    if few.exists():
        record = read_json(few)
        for b in record["settings"]["budgets"]:
            means = {
                k: mean_std([as_float(r["mean_dice"]) for r in fewshot.runs_of(record, k, b)])[0]
                for k in record["methods"]
            }
            print(f"few-shot {100 * b:g}%: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    print(f"wrote {out / 'benchmarks.md'} in {elapsed / 60:.1f} min; command: {command_line()}")
    print(f"machine: {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
