"""The three LoRA experts (image, patch, pixel) as named peft adapters on the encoder's Q and V projections."""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from samora.config import EXPERTS

# Matches the split projections made by SplitQKV inside every wrapped attention block; K stays frozen.
TARGET_MODULES = r".*\.attn\.core\.qkv\.(q|v)"


def attach_experts(encoder: nn.Module, rank: int = 4, names: tuple[str, ...] = EXPERTS) -> None:
    """Inject one LoRA adapter per expert name (A Kaiming-uniform, B zero: an exact no-op until trained)."""
    for name in names:
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGET_MODULES, bias="none")
        with warnings.catch_warnings():
            # peft warns that a second adapter joins an existing peft_config: that is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, encoder, adapter_name=name)


def expert_parameters(module: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """All LoRA parameters of one expert, by qualified name."""
    return {
        key: p
        for key, p in module.named_parameters()
        if (".lora_A." in key or ".lora_B." in key) and key.rsplit(".", 2)[-2] == name
    }


def expert_state(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A detached copy of one expert's weights (what an expert file stores)."""
    return {key: p.detach().cpu().clone() for key, p in expert_parameters(module, name).items()}


def load_expert_state(module: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load one expert's weights, requiring exactly the keys this model has for it."""
    params = expert_parameters(module, name)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"expert {name!r} does not fit this model: missing {missing[:3]} unexpected {unexpected[:3]} "
            "(was it trained for another preset or rank?)"
        )
    with torch.no_grad():
        for key, p in params.items():
            if state[key].shape != p.shape:
                shapes = f"{tuple(state[key].shape)} vs model {tuple(p.shape)}"
                raise ValueError(f"expert {name!r}: {key} has shape {shapes}")
            p.copy_(state[key])
