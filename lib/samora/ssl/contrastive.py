"""Image level of stage 1: SimCLR-style contrastive learning (NT-Xent on pooled neck features), with optional
distillation from a frozen, trained torchvision ResNet teacher."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samora.distributed.context import context, gather_rows
from samora.ssl.augment import SeededAugment, contrastive_views
from samora.ssl.objective_base import SSLObjective

__all__ = ["ContrastiveObjective", "TeacherError", "check_teacher", "load_teacher", "nt_xent"]


class TeacherError(ValueError):
    """A distillation teacher is unusable (wrong file, wrong architecture, or visibly untrained)."""


_IMAGENET_MEAN = (0.485, 0.456, 0.406)


_IMAGENET_STD = (0.229, 0.224, 0.225)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.15) -> torch.Tensor:
    """NT-Xent (SimCLR) loss: each view must pick its partner among the other 2B-1 embeddings."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (B, D) projections of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    # A view is trivially most similar to itself: exclude the diagonal from the softmax.
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


class ContrastivePreparer:
    """Two independently augmented views of a slice."""

    def __init__(self, augment: SeededAugment) -> None:
        self.augment = augment

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        return tuple(self.augment.views(image, seed, n=2))


class ContrastiveObjective(SSLObjective):
    """Image level: pooled neck features of two views -> projection MLP -> NT-Xent (+ optional distillation)."""

    level = "image"

    def __init__(
        self,
        embed_channels: int,
        image_size: int,
        temperature: float = 0.15,
        projection_dim: int = 128,
        hidden_dim: int = 256,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        crop_scale: tuple[float, float] = (0.6, 1.0),
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.distill_weight = distill_weight
        self.projector = nn.Sequential(
            nn.Linear(embed_channels, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )
        self.preparer = ContrastivePreparer(contrastive_views(image_size, crop_scale=crop_scale))
        # Kept in a tuple so the frozen teacher is neither trained, nor saved with the head, nor moved by .to().
        self._teacher: tuple[nn.Module, ...] = ()
        self.distill: nn.Module | None = None
        if teacher is not None:
            check_teacher(teacher)
            teacher.eval().requires_grad_(False)
            self._teacher = (teacher,)
            self.distill = nn.Linear(embed_channels, _teacher_width(teacher))

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen distillation teacher, if any."""
        return self._teacher[0] if self._teacher else None

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        view1, view2 = batch
        b = view1.shape[0]
        views = torch.cat([view1, view2])
        pooled = model.encode(views).mean(dim=(2, 3))
        # Batch norm and the negatives see the global batch when several ranks train (one process: unchanged).
        ctx = context()
        z = self.projector(torch.cat([gather_rows(pooled[:b], ctx), gather_rows(pooled[b:], ctx)]))
        half = z.shape[0] // 2
        contrastive = nt_xent(z[:half], z[half:], self.temperature)
        out = {"loss": contrastive, "ntxent": contrastive.detach()}
        teacher = self.teacher
        if teacher is not None and self.distill is not None:
            teacher = teacher.to(views.device)
            mean = torch.tensor(_IMAGENET_MEAN, device=views.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=views.device).view(1, 3, 1, 1)
            with torch.no_grad():
                target = teacher((views - mean) / std).flatten(1)
            distill = (1.0 - F.cosine_similarity(self.distill(pooled), target, dim=1)).mean()
            out["loss"] = contrastive + self.distill_weight * distill
            out["distill"] = distill.detach()
        return out

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "distill_weight": self.distill_weight if self.teacher else 0.0}


def load_teacher(path: str | Path, arch: str = "resnet50") -> nn.Module:
    """A frozen torchvision ResNet (fc removed) from a state-dict file, loaded with weights_only=True.

    Refuses files that do not fit the architecture and teachers that were visibly never trained (docs/design.md §15.4:
    the reference code distilled from randomly initialised teachers).
    """
    import torchvision

    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"{path}: teacher checkpoint not found")
    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        raise TeacherError(f"unsupported teacher architecture {arch!r} (expected a torchvision resnet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise TeacherError(f"{path}: not a plain tensor state dict loadable with weights_only=True ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"{path}: expected a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches (another depth or width) are raised even with strict=False
        raise TeacherError(f"{path} is not a torchvision {arch} state dict: {str(e).splitlines()[1:2]}") from e
    if result.missing_keys or result.unexpected_keys:
        raise TeacherError(
            f"{path} is not a torchvision {arch} state dict: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    check_teacher(net, source=str(path))
    return net.eval().requires_grad_(False)


def check_teacher(teacher: nn.Module, source: str = "teacher") -> None:
    """Refuse a teacher whose batch-norm statistics were never updated; warn when that cannot be checked."""
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        warnings.warn(
            f"{source}: cannot verify that the distillation teacher is trained (no batch-norm statistics); "
            "distilling from an untrained network is meaningless",
            stacklevel=2,
        )
        return
    untouched = all(
        torch.all(m.running_mean == 0) and torch.all(m.running_var == 1) for m in norms if m.running_mean is not None
    )
    if untouched:
        raise TeacherError(
            f"{source}: the teacher looks untrained (all batch-norm running statistics at their initial values); "
            "distilling from a random network is meaningless (docs/design.md §15.4)"
        )


def _teacher_width(teacher: nn.Module) -> int:
    """Width of the teacher's pooled output, found with one tiny forward pass."""
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        device = next(teacher.parameters()).device
        width = int(teacher(torch.zeros(1, 3, 64, 64, device=device)).flatten(1).shape[1])
    teacher.train(was_training)
    return width
