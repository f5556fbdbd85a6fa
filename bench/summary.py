"""The honest reading of docs/benchmarks.md: sentences computed from the numbers, so they stay true when the numbers
change. Their longer fixed wording is in report_template.md."""

from __future__ import annotations

import math
from collections.abc import Iterable

import active_learning
import fewshot
import numpy as np
from report import fill
from stats import mean_std

# (method a, method b, what a vs b measures): their Dice difference is reported at every budget
CONTRASTS = (
    ("samora", "samora_sum", "HL-Attn (reduced) vs plain sum of the expert residuals"),
    ("samora_ft", "samora", "fine-tuning the experts in stage 2 vs keeping them frozen"),
    ("hsam_ssl", "hsam", "H-SAM decoder with SSL experts + HL-Attn vs without SSL"),
    ("hsam", "samed", "H-SAM two-stage decoder vs the SAMed decoder (both without SSL)"),
)


def pct(budget: float) -> str:
    """A budget (fraction of the training slices) as a percentage."""
    return f"{100 * budget:g}%"


def pcts(budgets: Iterable[float], none: str = "no budget") -> str:
    """Budgets as a list of percentages, or `none`."""
    return ", ".join(pct(b) for b in budgets) or none


def fewshot_sentences(few: dict) -> list[str]:
    """Ranking per budget, SAMora vs SAMed, more labels, the UNet baseline, the ablations."""
    budgets = few["settings"]["budgets"]
    methods = few["methods"]

    def m(key: str, b: float) -> float:
        return mean_std([r["mean_dice"] for r in fewshot.runs_of(few, key, b)])[0]

    def sd(key: str, b: float) -> float:
        return mean_std([r["mean_dice"] for r in fewshot.runs_of(few, key, b)])[1]

    lines: list[str] = []
    for b in budgets:
        ranked = sorted(((m(k, b), k) for k in methods if not math.isnan(m(k, b))), reverse=True)
        if ranked:
            order = ", ".join(f"`{k}` {v:.3f}" for v, k in ranked)
            lines.append(f"At {pct(b)} of the training slices the ranking by mean Dice is: {order}.")
    if "samora" in methods and "samed" in methods:
        wins = [b for b in budgets if m("samora", b) > m("samed", b)]
        close = [b for b in budgets if abs(m("samora", b) - m("samed", b)) <= max(sd("samora", b), sd("samed", b))]
        verdict = "not reproduced here." if len(wins) < len(budgets) else "consistent with these numbers."
        lines.append(
            f"SAMora (b) vs the SAMed-style single LoRA (a): SAMora is ahead at {pcts(wins)}; the gap is within one "
            f"seed standard deviation at {pcts(close)}. The paper's claim (SSL experts + HL-Attn beat SAMed in "
            f"few-shot settings) is {verdict}"
        )
    low, high = min(budgets), max(budgets)
    smaller = [b for b in budgets if b != high]
    worse = [k for k in methods if k != "unet" and smaller and m(k, high) < max(m(k, b) for b in smaller)]
    if worse:
        steps, batch = few["settings"]["steps"], few["settings"]["batch_size"]
        full_epochs = steps * batch / max(1, len(few["data"]["train_slices"]))
        lines.append(
            fill(
                "more-labels",
                worse=len(worse),
                sam_methods=len(methods) - 1,
                high=f"{100 * high:g}",
                low=f"{100 * low:g}",
                steps=steps,
                batch=batch,
                full_epochs=f"{full_epochs:.0f}",
            )
        )
    if "unet" in methods:
        unet_wins = [b for b in budgets if m("unet", b) >= max(m(k, b) for k in methods if k != "unet")]
        if unet_wins:
            lines.append(fill("unet-best", budgets=pcts(unet_wins)))
    for a, b_, what in CONTRASTS:
        if a in methods and b_ in methods:
            diffs = ", ".join(f"{pct(b)}: {m(a, b) - m(b_, b):+.3f}" for b in budgets)
            lines.append(f"{what}: Dice difference {diffs}.")
    experts = [k for k in ("expert_image", "expert_patch", "expert_pixel") if k in methods]
    if experts and "samora" in methods:
        best = {b: max(experts, key=lambda k, b=b: m(k, b)) for b in budgets}
        pairs = ", ".join(f"{pct(b)}: `{best[b]}` {m(best[b], b):.3f} vs {m('samora', b):.3f}" for b in budgets)
        lines.append(f"Best single expert vs the fused three: {pairs}.")
    return lines


def efficiency_sentences(eff: dict) -> list[str]:
    """Epochs to 90% of the reference's final Dice, per SSL/reference pair."""
    lines: list[str] = []
    for p in eff["analysis"]["pairs"]:
        ssl_e, ref_e = p["ssl_epochs_to_target"], p["reference_epochs_to_target"]
        pair = f"Efficiency, `{p['ssl_method']}` vs `{p['reference']}`:"
        if p["target_dice"] < 0.02:
            lines.append(
                f"{pair} the reference ends at {p['reference_final_dice']:.3f} held-out Dice, too low for an "
                "epochs-to-90% comparison."
            )
            continue
        ssl_text = f"{ssl_e:.0f}" if ssl_e is not None else "no epoch within the budget"
        ref_text = f"{ref_e:.0f}" if ref_e is not None else "never"
        if ssl_e is None or ref_e is None or ssl_e > 0.1 * ref_e:
            verdict = "The paper's '90% fewer epochs' is not reproduced here."
        else:
            verdict = "This matches the paper's '90% fewer epochs'."
        lines.append(
            f"{pair} 90% of the reference's final Dice ({p['target_dice']:.3f}) is reached after {ssl_text} (SSL "
            f"variant) vs {ref_text} (reference) of {p['total_epochs']:.0f} epochs. {verdict}"
        )
    return lines


def active_learning_sentences(al: dict) -> list[str]:
    """Uncertainty vs random sampling: final Dice, labels saved, the mean over the rounds."""
    needed = active_learning.labels_needed(al)
    c = active_learning.curves(al)
    if not (needed and c):
        return []
    final_u = mean_std([ys[-1] for ys in c["uncertainty"][1]])
    reached = needed["uncertainty_labels_to_reach"]
    n_seeds = len(c["uncertainty"][1])
    if reached is not None and reached < needed["random_labels"]:
        verdict = (
            f"reaches random's final Dice with {reached} labelled studies, i.e. "
            f"{needed['random_labels'] - reached} fewer labels on the seed-mean curve"
        )
    elif reached is not None:
        verdict = "reaches random's final Dice only with the same number of labels: no saving"
    else:
        verdict = "never reaches random's final Dice within the budget: no saving"
    # Mean over the rounds after the shared first one: the whole curve, not only its last point.
    area = {k: float(np.mean([np.mean(ys[1:]) for ys in c[k][1]])) for k in ("uncertainty", "random")}
    return [
        f"Active learning: uncertainty sampling ends at {final_u[0]:.3f} ± {final_u[1]:.3f} mean test Dice vs "
        f"random {needed['random_final_mean_dice']:.3f} with {needed['random_labels']} labelled phantoms; it "
        f"{verdict}. Averaged over rounds 2-{needed['random_labels']}: uncertainty {area['uncertainty']:.3f} "
        f"vs random {area['random']:.3f}. {n_seeds} seed(s) on synthetic phantoms: differences within the "
        "seed spread are noise."
    ]


def reading(few: dict | None, eff: dict | None, al: dict | None) -> list[str]:
    """The summary's sentences for the results present."""
    return [
        *(fewshot_sentences(few) if few else []),
        *(efficiency_sentences(eff) if eff else []),
        *(active_learning_sentences(al) if al else []),
    ]
