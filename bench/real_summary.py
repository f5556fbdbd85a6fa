"""The section that leads docs/benchmarks.md: what the real, medically pretrained encoder (LiteMedSAM) answers, in
plain words, computed from the JSON records of bench/fewshot.py --preset litemedsam, bench/efficiency.py on that
record, and bench/active_ct.py (whichever exist).

    python bench/real_summary.py [--results docs/results]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import active_learning
import fewshot
from paths import ROOT
from records import read_json
from report import cpu_text, md_table
from stats import mean_std

PRESET = "litemedsam"
HEADLINE_BUDGET = 0.1
# the better of them is "SAMora" in the targets; the bf16 rows are the full-stage ones trained in bf16 on a CPU
SAMORA_MODES = ("samora_cached", "samora", "hsam_ssl", "samora_bf16", "hsam_ssl_bf16")
SAMED_ROWS = ("samed", "samed_bf16")  # the SAMed-style reference, in each precision that ran
ROW_ORDER = (*SAMORA_MODES, *SAMED_ROWS, "heads", "unet", "segresnet", "zeroshot", "zeroshot_sum")
TARGETS = {"vs_unet": 0.15, "vs_samed": 0.03, "epoch_share": 0.30, "label_share": 0.70}
CPU_HOURS_TARGET = 3.0  # the default set on the 2-core machine


def large_dice(few: dict, method: str, budget: float, key: str = "large_mean_dice") -> tuple[float, float, int]:
    """Mean and std over seeds of one row's mean Dice (8 large organs by default), and the number of seeds."""
    values = [r[key] for r in fewshot.runs_of(few, method, budget)]
    mean, std = mean_std(values)
    return mean, std, len(values)


def cell(few: dict, method: str, budget: float) -> str:
    """'large / all' for one row and budget, with the seed count when there is more than one."""
    large, large_sd, n = large_dice(few, method, budget)
    if not n:
        return "not run"
    everything = large_dice(few, method, budget, "mean_dice")[0]
    spread = f" ± {large_sd:.3f}" if n > 1 else ""
    return f"{large:.3f}{spread} / {everything:.3f}" + (f" ({n} seeds)" if n > 1 else "")


def dice_table(few: dict) -> str:
    """One row per method that ran: large-organ / all-organ mean Dice per budget."""
    budgets = few["settings"]["budgets"]
    rows = [
        [few["methods"][m], *(cell(few, m, b) for b in budgets)]
        for m in ROW_ORDER
        if m in few["methods"] and any(fewshot.runs_of(few, m, b) for b in budgets)
    ]
    return md_table(["mean Dice (8 large organs / all)", *(f"{100 * b:g}%" for b in budgets)], rows)


def best_samora(few: dict, budget: float) -> tuple[str, float] | None:
    """The SAMora mode with the highest large-organ Dice at `budget` (None if none ran)."""
    scored = [(large_dice(few, m, budget)[0], m) for m in SAMORA_MODES if fewshot.runs_of(few, m, budget)]
    scored = [(d, m) for d, m in scored if not math.isnan(d)]
    return (max(scored)[1], max(scored)[0]) if scored else None


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def fewshot_answers(few: dict) -> list[str]:
    """SAMora (its better mode) against the UNet and the SAMed-style LoRA at the headline budget."""
    b = HEADLINE_BUDGET
    best = best_samora(few, b)
    if best is None:
        return [f"No SAMora row at {100 * b:g}% yet."]
    mode, dice = best
    seeds = large_dice(few, mode, b)[2]
    lines = [f"SAMora's better mode at {100 * b:g}% of the labelled slices is `{mode}` ({dice:.3f}, {seeds} seed(s))."]
    for other, key in (("unet", "vs_unet"), *((samed, "vs_samed") for samed in SAMED_ROWS)):
        ref, _, n = large_dice(few, other, b)
        if not n:
            lines.append(f"Against `{other}`: not measured (no run at {100 * b:g}%).")
            continue
        lines.append(comparison_line(few, mode, other, b, TARGETS[key]))
    return lines


def seed_dice(few: dict, method: str, budget: float) -> dict[int, float]:
    """Large-organ mean Dice of each seed's run."""
    return {r["seed"]: r["large_mean_dice"] for r in fewshot.runs_of(few, method, budget)}


def comparison_line(few: dict, mode: str, other: str, budget: float, target: float) -> str:
    """The gap between two rows' seed means; where they ran different seeds, the gap paired on their shared seeds
    judges the target (a mean over more seeds against one seed compares draws, not methods)."""
    ours, theirs = seed_dice(few, mode, budget), seed_dice(few, other, budget)
    ref = mean_std(theirs.values())[0]
    gap = mean_std(ours.values())[0] - ref
    if set(ours) == set(theirs):
        return (
            f"Against `{other}` ({ref:.3f}): {gap:+.3f} large-organ mean Dice; target >= +{target:.2f}: "
            f"**{verdict(gap, target)}**."
        )
    shared = sorted(set(ours) & set(theirs))
    head = (
        f"Against `{other}` ({ref:.3f}, seeds {sorted(theirs)}): {gap:+.3f} large-organ mean Dice against our mean of "
        f"seeds {sorted(ours)}"
    )
    if not shared:
        return f"{head}; no seed in common, so the target (>= +{target:.2f}) is **not judged**."
    paired = mean_std(ours[s] - theirs[s] for s in shared)[0]
    per_seed = ", ".join(f"{ours[s] - theirs[s]:+.3f}" for s in shared)
    return (
        f"{head}; paired on the shared seeds {shared}: {paired:+.3f} ({per_seed}); target >= +{target:.2f}: "
        f"**{verdict(paired, target)}**."
    )


def efficiency_answers(eff: dict) -> list[str]:
    """Epochs each variant needs to reach 90% of the SAMed-style run's final held-out Dice."""
    lines = []
    for p in eff["analysis"]["pairs"]:
        if p["reference"] not in SAMED_ROWS:
            continue
        total, reached = p["total_epochs"], p["ssl_epochs_to_target"]
        if reached is None:
            lines.append(f"`{p['ssl_method']}` never reaches 90% of `{p['reference']}`'s final held-out Dice "
                         f"({p['target_dice']:.3f}) within {total:.1f} epochs: target **missed**.")  # fmt: skip
            continue
        share = reached / total
        lines.append(
            f"`{p['ssl_method']}` reaches 90% of `{p['reference']}`'s final held-out Dice ({p['target_dice']:.3f}) "
            "after "
            f"{reached:.1f} of {total:.1f} epochs ({share:.0%}; target <= {TARGETS['epoch_share']:.0%}: "
            f"**{'met' if share <= TARGETS['epoch_share'] else 'missed'}**)."
        )
    return lines or ["Fine-tuning efficiency: no SAMed-style curve yet, so no epochs-to-90% figure."]


def default_set_seconds(few: dict) -> tuple[float, list[str]]:
    """A lower bound on the machine seconds of the litemedsam profile's CPU job list: each job at the shortest
    training time measured for its method (every budget trains the same number of steps; the first cached run also
    filled the embedding cache), each seed's SSL at the shortest run in its precision, and the preparation
    (embeddings, evaluation) that the measured runs spent outside training, counted once. The methods never
    measured are returned by name, not guessed."""
    base = fewshot.PROFILES[PRESET]
    shortest: dict[str, float] = {}
    for key, seconds in [(r["method"], r["train_seconds"]) for r in few["runs"]] + [
        (_ssl_row(r), r["seconds"]) for r in few["ssl_runs"]
    ]:
        shortest[key] = min(seconds, shortest.get(key, seconds))
    wanted = [f"ssl/{p}" for p in fewshot.ssl_precisions(base) for _ in base["seeds"]]
    wanted += [
        m
        for s in base["seeds"]
        for b in base["budgets"]
        for m in base["methods"]
        if fewshot.runs_here(fewshot.METHODS[m], b, s, base)
    ]
    preparation = sum(r["seconds"] - r["train_seconds"] for r in few["runs"])
    total = preparation + sum(shortest[k] for k in wanted if k in shortest)
    return total, sorted({k for k in wanted if k not in shortest})


def _ssl_row(run: dict) -> str:
    """An SSL run's kind: "ssl/fp32" or "ssl/bf16" (its job key is "ssl/<seed>" in fp32, else "ssl/<seed>/<p>")."""
    key = run.get("key", "ssl/0")
    return f"ssl/{key.split('/')[2] if key.count('/') == 2 else 'fp32'}"


def cpu_cost_answers(few: dict) -> list[str]:
    """The CPU reality: what the rows above cost, and whether the full default set fits the 3-hour target."""
    spent = sum(r["seconds"] for r in few["runs"]) + sum(r["seconds"] for r in few["ssl_runs"])
    estimate, unmeasured = default_set_seconds(few)
    hours = estimate / 3600
    fits = "met" if hours <= CPU_HOURS_TARGET and not unmeasured else "missed"
    missing = f", not counting the methods never run here ({', '.join(unmeasured)})" if unmeasured else ""
    seeds = len(fewshot.PROFILES[PRESET]["seeds"])
    budget, seed = fewshot.FULL_STAGE_CPU
    return [
        f"CPU cost: the rows above took {spent / 3600:.1f} h of machine time. The `{PRESET}` profile's full CPU job "
        f"list ({seeds} seeds; full-stage rows at {100 * budget:g}%, seed {seed}) would take at least {hours:.1f} h "
        f"here{missing}; target <= {CPU_HOURS_TARGET:g} h: **{fits}**."
    ]


def active_learning_answers(al: dict) -> list[str]:
    """Labels the uncertainty strategy needs to reach random's final Dice."""
    needed = active_learning.labels_needed(al)
    if not needed:
        return []
    reached, total = needed["uncertainty_labels_to_reach"], needed["random_labels"]
    seeds = len({t["seed"] for t in al["trajectories"]})
    if reached is None:
        outcome = "never reaches it within the budget: target **missed**"
    else:
        share = reached / total
        outcome = (
            f"reaches it with {reached} ({share:.0%}; target <= {TARGETS['label_share']:.0%}: "
            f"**{'met' if share <= TARGETS['label_share'] else 'missed'}**)"
        )
    return [
        f"Active learning on real CT pseudo-studies ({seeds} seed(s)): random sampling ends at "
        f"{needed['random_final_mean_dice']:.3f} large-organ Dice with {total} labelled pseudo-studies; uncertainty "
        f"sampling {outcome}; per seed: {needed['per_seed']}."
    ]


def render(results: Path) -> str:
    """The section's markdown from the records present in `results`."""
    few_path = results / f"{fewshot.result_name(PRESET)}.json"
    if not few_path.exists():
        return ""
    few = read_json(few_path)
    eff_path, al_path = results / f"efficiency_{PRESET}.json", results / "active_ct.json"
    machine = few["machine"]
    out = [
        "## Real weights first: LiteMedSAM on real CT",
        "",
        f"Records: `{few_path.name}`" + "".join(f", `{p.name}`" for p in (eff_path, al_path) if p.exists())
        + f" (machine: {cpu_text(machine)}, {machine['cpu_cores_usable']} usable cores, GPU: {machine['gpu']}). "
        "Dice against the TotalSegmentator pseudo-labels of ct_abdomen_totalseg, held-out slabs. The numbered "
        "sections and the honest summary below them read the random-backbone runs unless they say otherwise.",
        "",
        dice_table(few),
        "",
        *(f"- {line}" for line in fewshot_answers(few)),
        *(f"- {line}" for line in cpu_cost_answers(few)),
    ]  # fmt: skip
    records = {few_path.name: few}
    if eff_path.exists():
        records[eff_path.name] = read_json(eff_path)
        out += [f"- {line}" for line in efficiency_answers(records[eff_path.name])]
    if al_path.exists():
        records[al_path.name] = read_json(al_path)
        out += [f"- {line}" for line in active_learning_answers(records[al_path.name])]
    out += ["", "Commands (each record names its own):", ""]
    for name, record in records.items():
        out.append(f"- `{name}`: `{record.get('command', '?')}` ({record.get('date', 'date not recorded')})")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"), help="folder of the JSON records")
    args = parser.parse_args(argv)
    text = render(Path(args.results))
    print(text or f"no {fewshot.result_name(PRESET)}.json in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
