"""Training plots written as PNG files with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samora.io_utils import atomic_write

__all__ = ["plot_loss_curves", "read_loss_log"]


def read_loss_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines loss log; a torn last line (crash mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curves(
    logs: Mapping[str, str | Path | Sequence[dict[str, Any]]],
    out_png: str | Path,
    title: str = "SAMora self-supervised pretraining",
    smooth: int = 10,
) -> Path:
    """One line per level (loss vs step, moving average over `smooth` steps, raw values faint); log-scale y.

    Losses of different objectives live on different scales (NT-Xent ~ log batch, MSE ~ 1e-2), so the y axis is
    logarithmic to keep every curve's shape readable on one plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for level, source in logs.items():
        records = read_loss_log(source) if isinstance(source, (str, Path)) else list(source)
        points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and r["loss"] > 0]
        if not points:
            continue
        steps, losses = zip(*points, strict=True)
        line = ax.plot(steps, losses, alpha=0.25, linewidth=0.8)[0]
        ax.plot(steps, _moving_average(losses, smooth), color=line.get_color(), linewidth=1.8, label=level)
        plotted += 1
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if plotted:
        ax.legend(title="level")
    fig.tight_layout()
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (same length as the input)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
