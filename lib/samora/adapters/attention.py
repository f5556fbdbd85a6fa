"""Attention wrapper that applies the LoRA experts and fuses their residuals (HL-Attn, docs/design.md §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

if TYPE_CHECKING:  # the backbones package imports this module to wrap its blocks
    from samora.backbones.base import AttentionCore


class SplitQKV(nn.Module):
    """A fused qkv Linear split into q, k, v Linears so LoRA can target Q and V only (K untouched).

    `rows` gives the fused output rows of q, k and v when they are not three contiguous thirds (TinyViT
    interleaves them per head); the split outputs are always concatenated as [q | k | v].
    """

    def __init__(self, fused: nn.Linear, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        dim = fused.in_features
        width = fused.out_features // 3
        if rows is None:
            rows = tuple(torch.arange(i * width, (i + 1) * width) for i in range(3))
        bias = fused.bias is not None
        self.q, self.k, self.v = (nn.Linear(dim, len(r), bias=bias) for r in rows)
        with torch.no_grad():
            for layer, index in zip((self.q, self.k, self.v), rows, strict=True):
                layer.weight.copy_(fused.weight[index])
                if bias:
                    layer.bias.copy_(fused.bias[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _base_and_deltas(layer: nn.Module, x: torch.Tensor, experts: list[str]) -> tuple[torch.Tensor, dict]:
    """Frozen output of a (possibly LoRA-wrapped) Linear and each named expert's low-rank update."""
    if not isinstance(layer, LoraLayer):
        return layer(x), {}
    base = layer.base_layer(x)
    deltas = {
        name: layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
        for name in experts
        if name in layer.lora_A
    }
    return base, deltas


class AdaptedAttention(nn.Module):
    """Replaces an encoder attention block; routes through no expert, one expert, their sum, or HL-Attn.

    mode: "off" (frozen SAM), an expert name (stage-1 SSL or single-expert ablation), "sum" (A0 + sum of
    residuals) or "fusion" (A0 + HL-Attn(residuals)).
    """

    def __init__(self, core: AttentionCore, experts: tuple[str, ...]) -> None:
        super().__init__()
        self.core = core
        self.experts = experts
        self.mode = "off"
        self.fusion: nn.Module | None = None

    def _qkv(self, x: torch.Tensor, experts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        qkv = self.core.qkv
        q, dq = _base_and_deltas(qkv.q, x, experts)
        k = qkv.k(x)
        v, dv = _base_and_deltas(qkv.v, x, experts)
        zeros = torch.zeros_like(k)
        deltas = {name: torch.cat([dq[name], zeros, dv[name]], dim=-1) for name in dq}
        return torch.cat([q, k, v], dim=-1), deltas

    def idle(self) -> bool:
        """Whether the experts provably add nothing in this mode: HL-Attn's output projection is all zeros (its
        initial state, and where cached training never trains it), or every routed expert's LoRA B is all zeros."""
        if self.mode == "fusion" and self.fusion is not None:
            up = getattr(self.fusion, "up", None)
            if isinstance(up, nn.Linear):
                return not up.weight.any() and (up.bias is None or not up.bias.any())
        if self.mode != "sum" and self.mode not in self.experts:
            return False
        routed = list(self.experts) if self.mode == "sum" else [self.mode]
        layers = [layer for layer in (self.core.qkv.q, self.core.qkv.v) if isinstance(layer, LoraLayer)]
        return all(not layer.lora_B[name].weight.any() for layer in layers for name in routed if name in layer.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.core.prepare(x)
        # Inference skips experts that add exactly zero: the same output for a quarter of the attention cost
        # (fusion mode otherwise attends once per expert plus once for the base).
        if self.mode == "off" or (not torch.is_grad_enabled() and self.idle()):
            qkv, _ = self._qkv(x, [])
            return self.core.attend(qkv, x)
        if self.mode in self.experts:
            qkv, deltas = self._qkv(x, [self.mode])
            return self.core.attend(qkv + deltas[self.mode], x)
        qkv, deltas = self._qkv(x, list(self.experts))
        base = self.core.attend(qkv, x)
        residuals = {name: self.core.attend(qkv + d, x) - base for name, d in deltas.items()}
        if self.mode == "sum":
            return base + sum(residuals.values())
        if self.mode == "fusion":
            if self.fusion is None:
                raise RuntimeError("mode 'fusion' needs a fusion module attached")
            return base + self.fusion(residuals)
        raise ValueError(f"unknown attention mode {self.mode!r}")
