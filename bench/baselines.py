"""Baselines that are not SAMora, as real implementations of samora.engine.segmenter.Segmenter: `finetune`,
`evaluate_slices` and `segment_volume` train and run them exactly as they do SamoraModel (same loop, loss,
schedule, best-epoch choice and inference path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BaselineConfig:
    """The SegmenterConfig of a baseline: plain full-resolution logits, single-slice input."""

    labels: dict[str, int]
    image_size: int
    context: str = "single"
    decoder: str = "samed"  # no H-SAM low-resolution term in the loss

    @property
    def num_classes(self) -> int:
        """Output channels, background included."""
        return max(self.labels.values()) + 1


@dataclass(frozen=True)
class NoPretrainedBackbone:
    """A baseline has no pretrained prompt path whose learning rate must be lowered."""

    pretrained: bool = False


class UNetModel(torch.nn.Module):
    """A MONAI 2D network trained from scratch (UNet, or SegResNet with arch="segresnet"); no separate encoder (the
    'embedding' is the image) and no prompt path."""

    CHANNELS = (16, 32, 64, 128, 256)

    def __init__(self, labels: dict[str, int], image_size: int, seed: int, arch: str = "unet") -> None:
        super().__init__()
        self.config = BaselineConfig(dict(labels), image_size)
        self.backbone = NoPretrainedBackbone()
        self.prompt_head = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = self._network(arch, self.config.num_classes)

    @classmethod
    def _network(cls, arch: str, num_classes: int) -> torch.nn.Module:
        from monai.networks.nets import SegResNet, UNet

        if arch == "segresnet":
            return SegResNet(spatial_dims=2, in_channels=3, out_channels=num_classes, init_filters=16)
        if arch == "unet":
            return UNet(
                spatial_dims=2,
                in_channels=3,
                out_channels=num_classes,
                channels=cls.CHANNELS,
                strides=(2, 2, 2, 2),
                num_res_units=2,
            )
        raise ValueError(f"unknown baseline network {arch!r}")

    def set_stage(self, stage: str) -> None:
        """Every parameter trains in 'finetune'; nothing else changes."""
        for p in self.parameters():
            p.requires_grad_(stage == "finetune")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters with requires_grad."""
        return [p for p in self.parameters() if p.requires_grad]

    def prompt_path_parameters(self) -> list[torch.nn.Parameter]:
        """No prompt path."""
        return []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """No separate encoder: the 'embedding' is the image."""
        return images

    def decode(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-resolution logits."""
        return {"logits": self.net(embedding)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(images)

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Softmax over classes."""
        return torch.softmax(out["logits"], dim=1)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """All weights (for best-epoch restore)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}
