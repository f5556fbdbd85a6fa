"""Stage 1: hierarchical self-supervised objectives that train the image, patch and pixel LoRA experts."""

from samora.ssl.experts_io import (
    EXPERT_FORMAT,
    ExpertFileError,
    expert_paths,
    load_experts,
    read_expert_metadata,
    save_expert,
    trained_levels,
    verify_expert,
)
from samora.ssl.objectives import (
    OBJECTIVES,
    ContrastiveObjective,
    DenoisingObjective,
    MaskedImageObjective,
    MaskedPixelObjective,
    SSLObjective,
    TeacherError,
    build_objective,
    load_teacher,
    nt_xent,
)
from samora.ssl.pretraining import pretrain
from samora.ssl.trainer import SILENT, RunHooks, SSLSettings, train_expert

__all__ = [
    "EXPERT_FORMAT",
    "OBJECTIVES",
    "SILENT",
    "ContrastiveObjective",
    "DenoisingObjective",
    "ExpertFileError",
    "MaskedImageObjective",
    "MaskedPixelObjective",
    "RunHooks",
    "SSLObjective",
    "SSLSettings",
    "TeacherError",
    "build_objective",
    "expert_paths",
    "load_experts",
    "load_teacher",
    "nt_xent",
    "pretrain",
    "read_expert_metadata",
    "save_expert",
    "train_expert",
    "trained_levels",
    "verify_expert",
]
