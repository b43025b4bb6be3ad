"""Random-weight Flux.1 diffusion models (dev, schnell) in Black Forest Labs' layout (unet/ files).

Built as diffusers' FluxTransformer2DModel on the meta device, block by block, and renamed to BFL keys
by the service's own map (unet/flux/layout.py); fused BFL tensors (qkv, linear1) are assembled once
all their diffusers parts have been materialised, so a full-size file is written with the same
bounded memory as fixtures.py's other writers.

small: hidden 64, 2 heads of 32 (RoPE axes 4+14+14), 2 double + 2 single blocks, T5 width 32, pooled
width 16 (about 1.5 MB). full: Flux.1's own sizes (hidden 3072, 24 heads, 19 + 38 blocks, 4096, 768).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from luna_stack.devtools.fixtures import Size, _metadata, _on_meta, _Part, _seed, _write
from luna_stack.unet.flux.layout import FLUX1_DEV, FluxConfig, diffusers_to_bfl, module_map, norm_map

Variant = Literal["dev", "schnell"]
Tensor = torch.Tensor
_SMALL = FluxConfig(
    hidden=64,
    heads=2,
    depth=2,
    depth_single=2,
    in_channels=64,
    out_channels=64,
    context_dim=32,
    pooled_dim=16,
    guidance=True,
)


def flux_config(variant: Variant = "dev", size: Size = "small") -> FluxConfig:
    return dataclasses.replace(_SMALL if size == "small" else FLUX1_DEV, guidance=variant == "dev")


class _ToBfl:
    """Rename: diffusers weights in, BFL tensors out as soon as every part of one has arrived."""

    def __init__(self, config: FluxConfig):
        self.config = config
        self.pending: dict[str, Tensor] = {}
        self.sources = {bfl: [d] for bfl, d in norm_map(config).items()}
        for module, parts in module_map(config).items():
            for param in ("weight", "bias"):
                self.sources[f"{module}.{param}"] = [f"{p.module}.{param}" for p in parts]

    def __call__(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        self.pending.update(weights)
        out = diffusers_to_bfl(self.pending, self.config)
        for key in out:
            for name in self.sources[key]:
                del self.pending[name]
        return out


def flux_part(variant: Variant, size: Size, seed: int, prefix: str = "") -> _Part:
    from diffusers import FluxTransformer2DModel

    config = flux_config(variant, size)
    return _Part(
        _on_meta(lambda: FluxTransformer2DModel(**config.diffusers_kwargs())),
        _ToBfl(config),
        prefix,
        _seed(seed, "unet"),
    )


def write_flux(
    path: str | Path,
    variant: Variant = "dev",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A standalone Flux.1 file (unet/ or diffusion_models/) in BFL naming, no prefix."""
    part = flux_part(variant, size, seed)
    return _write(Path(path), [part], dtype, _metadata("unet", f"flux-{variant}", size, seed))
