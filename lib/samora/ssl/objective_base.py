"""The interface of a stage-1 objective: a head whose parameters train together with one expert."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["SSLObjective"]


class SSLObjective(nn.Module):
    """One stage-1 objective: the head's parameters train together with the expert of `level`."""

    level: str = ""
    preparer: Any

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        """Loss terms; "loss" is what is minimised."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Hyper-parameters recorded in the expert metadata."""
        return {}
