"""What stage-2 training (`finetune`, `evaluate_slices`) and volume inference (`segment_volume`) need from a
segmentation model. SamoraModel is one; bench/baselines.py's UNet is another, trained and evaluated by the very
same loop, loss, schedule, best-epoch choice and inference path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Segmenter", "SegmenterBackbone", "SegmenterConfig"]


class SegmenterConfig(Protocol):
    """The model facts the training and inference code reads."""

    @property
    def num_classes(self) -> int: ...  # output channels, background included

    image_size: int  # the square input size S slices are letterboxed to
    context: str  # "single" or "2.5d": how a slice becomes the 3 input channels
    decoder: str  # "hsam" adds H-SAM's low-resolution loss term; anything else trains on "logits" only


class SegmenterBackbone(Protocol):
    pretrained: bool  # a pretrained prompt path learns at a lower rate (FinetuneConfig.prompt_lr_scale)


@runtime_checkable
class Segmenter(Protocol):
    """A 2D slice segmenter: images (B, 3, S, S) in [0, 1] -> embedding -> {"logits": (B, K, S, S), ...}."""

    config: SegmenterConfig
    backbone: SegmenterBackbone
    prompt_head: Any  # a PromptHead trained with simulated prompts, or None (no prompt path)

    def set_stage(self, stage: str) -> None:
        """Which parameters train: "finetune" (all stage-2 trainables), "finetune-heads" (cached mode: the heads
        and prompt path on frozen-encoder embeddings), "inference" (none)."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def prompt_path_parameters(self) -> list[nn.Parameter]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K, S, S) class probabilities of decode's output."""

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (restored at the best epoch with load_state_dict(strict=False))."""

    # the torch.nn.Module members the loops use
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...
