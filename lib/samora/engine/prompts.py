"""Prompts simulated from labels, to train the prompt path in stage 2 (viewer clicks and boxes are turned into
prompts by samora.serving.interactive)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SimulatedPrompt:
    """One training prompt for one image: points and/or a box in model pixels, and its binary target."""

    coords: torch.Tensor  # (N, 2) x, y
    point_labels: torch.Tensor  # (N,) 1 fg, 0 bg, -1 padding
    box: torch.Tensor | None  # (4,) x0, y0, x1, y1
    target: torch.Tensor  # (S, S) float {0, 1}


def bounding_box(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a 2D mask's foreground, or None when empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def simulate_prompt(
    label: torch.Tensor,
    rng: np.random.Generator,
    max_foreground_points: int = 3,
    box_probability: float = 0.5,
    jitter: float = 0.1,
    point_slots: int = 3,
) -> SimulatedPrompt | None:
    """Pick a present class; sample points inside/outside it or a jittered bounding box. None if no foreground.

    A point prompt has 1..`max_foreground_points` points inside the class and background points in the remaining
    of its `point_slots` (padding label -1 fills the rest); a box prompt pads all `point_slots`."""
    classes = [int(c) for c in torch.unique(label) if c > 0]
    if not classes:
        return None
    target = (label == int(rng.choice(classes))).float()
    mask = target.numpy() > 0
    size = label.shape[-1]
    if rng.random() < box_probability:
        x0, y0, x1, y1 = bounding_box(mask)
        w, h = max(x1 - x0, 1), max(y1 - y0, 1)
        noise = rng.normal(0, jitter, 4) * np.array([w, h, w, h])
        box = np.clip(np.array([x0, y0, x1, y1], dtype=np.float64) + noise, 0, size - 1)
        box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
        coords = torch.zeros(point_slots, 2)
        labels = -torch.ones(point_slots)
        return SimulatedPrompt(coords, labels, torch.tensor(box, dtype=torch.float32), target)
    fg = np.argwhere(mask)
    bg = np.argwhere(~mask)
    n_fg = int(rng.integers(1, max_foreground_points + 1))
    n_bg = int(rng.integers(0, point_slots - n_fg + 1)) if point_slots > n_fg else 0
    picks = [fg[rng.integers(len(fg))] for _ in range(n_fg)] + [bg[rng.integers(len(bg))] for _ in range(n_bg)]
    coords = torch.zeros(point_slots, 2)
    labels = -torch.ones(point_slots)
    for i, (y, x) in enumerate(picks):
        coords[i] = torch.tensor([x + 0.5, y + 0.5])  # SAM's prompt encoder expects pixel centres
        labels[i] = 1.0 if i < n_fg else 0.0
    return SimulatedPrompt(coords, labels, None, target)
