"""Fine-tuning efficiency: held-out Dice per epoch with and without SSL experts, and the epochs each SSL variant
needs to reach 90% of the no-SSL run's final Dice.

    python bench/efficiency.py [--fewshot docs/results/fewshot.json] [--out docs] [--quick]

The curves come from the 100%-budget runs of bench/fewshot.py (recorded once per full-data epoch on the test slabs;
monitoring only, never used to pick a checkpoint). Without a few-shot result file this script runs those runs
itself (methods samed, samora, samora_ft, hsam, hsam_ssl at 100% of the training slices). Writes
OUT/results/efficiency.json and OUT/efficiency_curves.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import fewshot
import numpy as np
from cli import add_common_args
from paths import DATA
from plots import plot_lines
from records import command_line, machine_info, now_utc, read_json, write_json
from report import fmt_ms, header_lines, md_table

PAIRS = (  # (variant, reference: the run whose final Dice sets the 90% target)
    ("samora", "samed"),
    ("samora_ft", "samed"),
    ("samora_sum", "samed"),
    ("hsam_ssl", "hsam"),
    ("hsam_ssl", "samed"),
    ("samora_cached", "samed"),  # real weights: the cheap mode trains on cached embeddings, same step budget
    ("heads", "samed"),
    # bf16-trained full-stage rows (real weights on a CPU): against the reference in the same precision, and fp32's
    ("samora_bf16", "samed_bf16"),
    ("hsam_ssl_bf16", "samed_bf16"),
    ("samora_bf16", "samed"),
    ("hsam_ssl_bf16", "samed"),
)
CURVE_METHODS = (
    *("samed", "samora", "samora_ft", "samora_sum", "hsam", "hsam_ssl", "unet", "samora_cached", "heads"),
    *("samed_bf16", "samora_bf16", "hsam_ssl_bf16"),
)


def method_curves(fewshot_record: dict, budget: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per method: epochs (full-data) and the per-seed held-out Dice at each."""
    out: dict[str, dict[str, Any]] = {}
    for method in fewshot_record["methods"]:
        runs = [r for r in fewshot.runs_of(fewshot_record, method, budget) if r.get("curve")]
        if not runs:
            continue
        lengths = {len(r["curve"]) for r in runs}
        n = min(lengths)
        out[method] = {
            "epochs": [p["epoch"] for p in runs[0]["curve"][:n]],
            "seeds": [r["seed"] for r in runs],
            "heldout_dice": [[p["heldout_dice"] for p in r["curve"][:n]] for r in runs],
            "train_dice": [[p["train_dice"] for p in r["curve"][:n]] for r in runs],
        }
    return out


def curve_budget(fewshot_record: dict) -> float:
    """The label budget whose runs recorded held-out curves (100% unless the run says otherwise)."""
    return fewshot_record["settings"].get("curve_budgets", [1.0])[0]


def first_epoch_reaching(epochs: list[float], values: list[float], target: float) -> float | None:
    """First epoch whose value is >= target (None if never)."""
    for e, v in zip(epochs, values, strict=True):
        if v is not None and not math.isnan(v) and v >= target:
            return float(e)
    return None


def analyse(fewshot_record: dict) -> dict[str, Any]:
    """Epochs-to-90% for every (SSL, no-SSL) pair, on the seed-mean curves and per seed."""
    curves = method_curves(fewshot_record, curve_budget(fewshot_record))
    pairs = []
    for ssl_method, ref in PAIRS:
        if ssl_method not in curves or ref not in curves:
            continue
        ref_curve, ssl_curve = curves[ref], curves[ssl_method]
        ref_mean = np.mean(np.array(ref_curve["heldout_dice"], dtype=float), axis=0)
        ssl_mean = np.mean(np.array(ssl_curve["heldout_dice"], dtype=float), axis=0)
        target = 0.9 * float(ref_mean[-1])
        per_seed = {}
        for seed, ys in zip(ssl_curve["seeds"], ssl_curve["heldout_dice"], strict=True):
            if seed not in ref_curve["seeds"]:
                continue
            ref_ys = ref_curve["heldout_dice"][ref_curve["seeds"].index(seed)]
            per_seed[str(seed)] = {
                "target": 0.9 * ref_ys[-1],
                "ssl_epochs": first_epoch_reaching(ssl_curve["epochs"], ys, 0.9 * ref_ys[-1]),
                "ref_epochs": first_epoch_reaching(ref_curve["epochs"], ref_ys, 0.9 * ref_ys[-1]),
            }
        ssl_epochs = first_epoch_reaching(ssl_curve["epochs"], list(ssl_mean), target)
        ref_epochs = first_epoch_reaching(ref_curve["epochs"], list(ref_mean), target)
        pairs.append(
            {
                "ssl_method": ssl_method,
                "reference": ref,
                "reference_final_dice": float(ref_mean[-1]),
                "ssl_final_dice": float(ssl_mean[-1]),
                "target_dice": target,
                "total_epochs": float(ref_curve["epochs"][-1]),
                "ssl_epochs_to_target": ssl_epochs,
                "reference_epochs_to_target": ref_epochs,
                "epoch_saving": (
                    None if ssl_epochs is None or ref_epochs is None else 1.0 - ssl_epochs / max(ref_epochs, 1e-9)
                ),
                "per_seed": per_seed,
            }
        )
    return {"curves": curves, "pairs": pairs}


def output_name(fewshot_record: dict) -> str:
    """File stem of this analysis: efficiency, or efficiency_<preset> for a pretrained preset's few-shot run."""
    return "efficiency" + fewshot.result_name(fewshot_record["settings"]["preset"]).removeprefix("fewshot")


def plot(analysis: dict, titles: dict[str, str], out: Path, name: str = "efficiency") -> Path:
    """Held-out Dice per epoch, mean ± std over seeds."""
    series = {
        titles.get(m, m): (c["epochs"], c["heldout_dice"]) for m, c in analysis["curves"].items() if m in CURVE_METHODS
    }
    hlines = {
        f"90% of {p['reference']}'s final Dice": p["target_dice"]
        for p in analysis["pairs"]
        if p["ssl_method"] == "samora"
    }
    return plot_lines(
        series=series,
        out_png=out / f"{name}_curves.png",
        title="Fine-tuning: held-out Dice per epoch (mean ± std over seeds)",
        xlabel="epoch (full training set)",
        ylabel="Dice on the test slabs",
        hlines=hlines,
    )


def render_markdown(record: dict) -> str:
    """The efficiency section of docs/benchmarks.md."""
    analysis = record["analysis"]
    titles = record["methods"]
    out = intro_lines(curve_budget(record))
    out.append(pairs_table(analysis["pairs"]))
    out += ["", "Held-out Dice per epoch (mean ± std over seeds):", ""]
    curves = analysis["curves"]
    if curves:
        out.append(curves_table(curves))
    out += ["", f"Method keys: {', '.join(f'`{m}` = {titles.get(m, m)}' for m in curves)}.", ""]
    out += [f"![efficiency]({output_name(record)}_curves.png)", ""]
    return "\n".join(out)


def intro_lines(budget: float) -> list[str]:
    """The section's title and what its numbers mean."""
    return [
        "## 2. Fine-tuning efficiency",
        "",
        "Held-out Dice (pooled over the test slabs' slices at the model's input size, classes present there) after "
        f"every epoch (of the full training set's length) of the {100 * budget:g}%-budget runs of the few-shot "
        "section: same seeds, same step budget, same data. The curve is monitoring only; the few-shot models are "
        "chosen on their training slices. `epochs to 90%`: first epoch at which the seed-mean curve reaches 90% of "
        "the reference's final (last-epoch) seed-mean Dice; per seed in brackets (each seed against its own "
        "reference).",
        "",
    ]


PAIR_COLUMNS = (
    "pair",
    "reference final Dice",
    "variant final Dice",
    "target (90%)",
    "reference epochs to target",
    "variant epochs to target (per seed)",
    "epochs saved",
    "epochs run",
)


def pairs_table(pairs: list[dict[str, Any]]) -> str:
    """One row per (variant, reference) pair: final Dice of both, the 90% target and the epochs each needs."""
    return md_table(PAIR_COLUMNS, [pair_row(p) for p in pairs])


def pair_row(p: dict[str, Any]) -> list[str]:
    """A pair's cells; epochs that never reach the target read `never`, the variant's per seed in brackets."""
    per_seed = ", ".join(
        f"{s}: {v['ssl_epochs'] if v['ssl_epochs'] is not None else 'never'}" for s, v in p["per_seed"].items()
    )
    saving = "-" if p["epoch_saving"] is None else f"{100 * p['epoch_saving']:.0f}%"
    return [
        f"{p['ssl_method']} vs {p['reference']}",
        f"{p['reference_final_dice']:.3f}",
        f"{p['ssl_final_dice']:.3f}",
        f"{p['target_dice']:.3f}",
        "never" if p["reference_epochs_to_target"] is None else f"{p['reference_epochs_to_target']:.0f}",
        ("never" if p["ssl_epochs_to_target"] is None else f"{p['ssl_epochs_to_target']:.0f}") + f" ({per_seed})",
        saving,
        f"{p['total_epochs']:.0f}",
    ]


def curves_table(curves: dict[str, dict[str, Any]]) -> str:
    """Held-out Dice per epoch (mean ± std over seeds), one column per plotted method; `-` past a shorter curve."""
    epochs = next(iter(curves.values()))["epochs"]
    methods = [m for m in curves if m in CURVE_METHODS]
    rows = []
    for i, e in enumerate(epochs):
        cells = [
            fmt_ms([ys[i] for ys in curves[m]["heldout_dice"]]) if i < len(curves[m]["epochs"]) else "-"
            for m in methods
        ]
        rows.append([f"{e:.1f}", *cells])
    return md_table(["epoch", *methods], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--fewshot", default=None, help="few-shot result JSON (default: OUT/results/fewshot.json)")
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    out = Path(args.out)
    source = Path(args.fewshot) if args.fewshot else out / "results" / "fewshot.json"
    if source.exists():
        fewshot_record = read_json(source)
        print(f"efficiency: reading the 100%-budget curves of {source}", flush=True)
    else:
        print(f"efficiency: {source} not found; running the 100%-budget few-shot runs", flush=True)
        few_args = [
            *(["--quick"] if args.quick else []),
            "--out", str(out), "--work", args.work, "--data", args.data,
            "--workers", str(args.workers), "--threads", str(args.threads),
            "--budgets", "1.0", "--methods", "samed", "samora", "samora_ft", "hsam", "hsam_ssl",
        ]  # fmt: skip
        if args.checkpoint:
            few_args += ["--checkpoint", args.checkpoint]
        if args.preset:
            few_args += ["--preset", args.preset]
        if args.seeds:
            few_args += ["--seeds", *map(str, args.seeds)]
        fewshot_record = fewshot.run(fewshot.build_parser().parse_args(few_args))
        source = write_json(out / "results" / "fewshot_efficiency_runs.json", fewshot_record)
    analysis = analyse(fewshot_record)
    record = {
        "benchmark": "efficiency",
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(args.workers, args.threads),
        "quick": bool(args.quick or fewshot_record.get("quick")),
        "source": str(source),
        "source_command": fewshot_record["command"],
        "settings": fewshot_record["settings"],
        "methods": fewshot_record["methods"],
        "analysis": analysis,
        "wall_s": time.perf_counter() - wall,
    }
    name = output_name(fewshot_record)
    path = write_json(out / "results" / f"{name}.json", record)
    png = plot(analysis, fewshot_record["methods"], out, name)
    print(render_markdown(record))
    print("\n".join(header_lines(record)))
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
