"""How sure SAM's mask decoder is of a mask: the one stability rule shared by prompts and click boxes."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import calculate_stability_score

STABILITY_OFFSET = 1.0  # logit offset of SAM's stability score (as in its automatic mask generator)


def mask_stability(logits: np.ndarray) -> float:
    """SAM's stability score: area above +1 over area above -1 (1.0 = a crisp mask; low = the model hesitates)."""
    if not (logits > -STABILITY_OFFSET).any():
        return 0.0
    return float(calculate_stability_score(torch.as_tensor(logits)[None], 0.0, STABILITY_OFFSET)[0])
