"""Line plots of per-seed curves (mean with a ±1 std band), written as PNG without a display."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from stats import as_float


def plot_lines(
    series: dict[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    out_png: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
    xticks: Sequence[float] | None = None,
    xticklabels: Sequence[str] | None = None,
    logx: bool = False,
) -> Path:
    """One line per series: x and a list of per-seed y lists; the mean is drawn with a +-1 std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (x, ys) in series.items():
        arr = np.array([[as_float(v) for v in y] for y in ys], dtype=float)
        if arr.size == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(arr, axis=0), np.nanstd(arr, axis=0)
        line = ax.plot(x, mean, marker="o", markersize=3, linewidth=1.6, label=name)[0]
        if arr.shape[0] > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="bottom", color="grey")
    if logx:
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks))
        if xticklabels is not None:
            ax.set_xticklabels(list(xticklabels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
