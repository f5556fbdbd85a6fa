"""Backbone presets and the official SAM checkpoints they can load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A published checkpoint: where to get it and how to verify it."""

    filename: str
    url: str
    sha256: str
    size: str


@dataclass(frozen=True)
class BackbonePreset:
    """Shape of a SAM ViT backbone and of its prompt/mask decoder."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    checkpoint: OfficialCheckpoint | None = None


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

PRESETS: dict[str, BackbonePreset] = {
    # Same module classes at toy size: CPU tests, demos and CI.
    "tiny": BackbonePreset(
        "tiny",
        embed_dim=96,
        depth=4,
        num_heads=3,
        global_attn_indexes=(1, 3),
        window_size=8,
        prompt_dim=64,
        decoder_mlp_dim=256,
        decoder_heads=4,
    ),
    "vit_b": BackbonePreset(
        "vit_b",
        768,
        12,
        12,
        (2, 5, 8, 11),
        checkpoint=OfficialCheckpoint(
            "sam_vit_b_01ec64.pth",
            _SAM_URL + "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "375 MB",
        ),
    ),
    "vit_l": BackbonePreset(
        "vit_l",
        1024,
        24,
        16,
        (5, 11, 17, 23),
        checkpoint=OfficialCheckpoint(
            "sam_vit_l_0b3195.pth",
            _SAM_URL + "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "1.2 GB",
        ),
    ),
    "vit_h": BackbonePreset(
        "vit_h",
        1280,
        32,
        16,
        (7, 15, 23, 31),
        checkpoint=OfficialCheckpoint(
            "sam_vit_h_4b8939.pth",
            _SAM_URL + "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "2.5 GB",
        ),
    ),
}
