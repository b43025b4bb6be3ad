"""Random-weight SD3 / SD3.5 MMDiT files in Stability's (SAI) layout, as ComfyUI users have them.

Variants: `sd3` (SD3 medium), `sd3.5-medium` (dual attention in the first blocks, qk RMS norm),
`sd3.5-large` (qk RMS norm). Full size is the released models' config; small keeps each variant's
structure with 2 joint blocks of 128 wide (ComfyUI derives heads and depth from the width: 64 per head,
one block per head, so small files must keep blocks = heads = width / 64), a 32×32 position table
(latents up to 64², images up to 512²) and narrow context / pooled widths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.normalization import RMSNorm
from torch import nn

from luna_stack.unet.sd3.layout import HEAD_DIM, Sd3Config, diffusers_to_sai

from .fixtures import Size, _metadata, _on_meta, _Part, _seed, _write

Variant = Literal["sd3", "sd3.5-medium", "sd3.5-large"]
VARIANTS: tuple[Variant, ...] = ("sd3", "sd3.5-medium", "sd3.5-large")
CHECKPOINT_PREFIX = "model.diffusion_model."

_FULL = {  # (blocks, position table side)
    "sd3": (24, 192),
    "sd3.5-medium": (24, 384),
    "sd3.5-large": (38, 192),
}
_SMALL_BLOCKS, _SMALL_POS, _SMALL_CONTEXT, _SMALL_POOLED = 2, 32, 96, 48


def _dual(variant: Variant, size: Size) -> tuple[int, ...]:
    """SD3.5 medium: dual attention in blocks 0..12 of 24 (small: block 0 of 2)."""
    if variant != "sd3.5-medium":
        return ()
    return tuple(range(13)) if size == "full" else (0,)


def sd3_config(variant: Variant = "sd3", size: Size = "small") -> Sd3Config:
    blocks, pos = _FULL[variant] if size == "full" else (_SMALL_BLOCKS, _SMALL_POS)
    return Sd3Config(
        in_channels=16,
        out_channels=16,
        patch_size=2,
        num_layers=blocks,
        num_attention_heads=blocks,  # SAI's MMDiTs: width = 64 × blocks
        joint_attention_dim=4096 if size == "full" else _SMALL_CONTEXT,
        pooled_projection_dim=2048 if size == "full" else _SMALL_POOLED,
        pos_embed_max_size=pos,
        dual_attention_layers=_dual(variant, size),
        qk_norm="rms_norm" if variant != "sd3" else None,
    )


class _FixturePatchEmbed(PatchEmbed):
    """PatchEmbed whose position table is a parameter with random values (the writer initialises
    parameters only; a real file's table is learned, so any values are as good as sincos)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.5)


class _FixtureRMSNorm(RMSNorm):
    """qk RMS norms with scales near 1 (not exactly 1, so a misplaced norm weight shows in outputs)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=1.0, std=0.2)


def build_sd3(cfg: Sd3Config) -> SD3Transformer2DModel:
    """diffusers' SD3 transformer for `cfg` (on the current default device), made writable by _write."""
    model = SD3Transformer2DModel(**cfg.diffusers_kwargs())
    pe = model.pos_embed
    table = pe.pos_embed
    del pe._buffers["pos_embed"]
    pe.pos_embed = nn.Parameter(torch.empty_like(table))
    pe.__class__ = _FixturePatchEmbed
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = _FixtureRMSNorm
    return model


def _sd3_part(cfg: Sd3Config, seed: int, prefix: str) -> _Part:
    assert cfg.hidden == HEAD_DIM * cfg.num_layers, "ComfyUI reads blocks = width / 64"
    return _Part(
        build=_on_meta(lambda: build_sd3(cfg)),
        rename=lambda sd: diffusers_to_sai(sd, cfg),
        prefix=prefix,
        seed=_seed(seed, "unet"),
    )


def write_sd3(
    path: str | Path,
    variant: Variant = "sd3",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    prefix: str = "",
) -> Path:
    """A standalone MMDiT (unet/ or diffusion_models/ file, SAI names); prefix `model.diffusion_model.`
    writes it as the diffusion-model section of an all-in-one checkpoint."""
    part = _sd3_part(sd3_config(variant, size), seed, prefix)
    kind = "checkpoint" if prefix else "unet"
    return _write(Path(path), [part], dtype, _metadata(kind, variant, size, seed))


def sd3_file_name(variant: Variant, size: Size = "small") -> str:
    return f"{variant}-{size}.safetensors"


def write_sd3_small(unet: Path, seed: int, dtype: torch.dtype) -> dict[str, Path]:
    """unet/<variant>-small.safetensors, every variant: what write_models_dir adds."""
    return {f"{v}_unet": write_sd3(unet / sd3_file_name(v), v, "small", seed, dtype) for v in VARIANTS}


def sd3_demo_row() -> str:
    """The README demo-models table's row for the files write_sd3_small writes."""
    cfg = sd3_config("sd3", "small")
    files = ", ".join(f"`unet/{sd3_file_name(v)}`" for v in VARIANTS)
    return (
        f"| {files} | SD3 medium / SD3.5 medium (dual attention in block 0) / SD3.5 large (qk norm) MMDiTs, "
        f"SAI layout | {cfg.num_layers} joint blocks {cfg.hidden} wide; `context` [B, T, "
        f"{cfg.joint_attention_dim}], `y` [B, {cfg.pooled_projection_dim}]; latent [B, 16, H/8, W/8] up to "
        f"{cfg.pos_embed_max_size * cfg.patch_size}² (512² images) |"
    )
