"""The learning-rate schedule of both training stages: linear warm-up, then polynomial decay to 0."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["warmup_poly", "warmup_steps"]


def warmup_steps(total_steps: int, fraction: float) -> int:
    """Warm-up length: `fraction` of the total steps, at least one step."""
    return max(1, int(total_steps * fraction))


def warmup_poly(total_steps: int, warmup_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """LR factor for optimizer step `s` (0-based): linear warm-up reaching 1 at the last warm-up step, then
    (1 - progress)^power down to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / span) ** power

    return factor
