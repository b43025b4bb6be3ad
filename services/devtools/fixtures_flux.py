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
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from luna_stack.devtools.fixtures import Size, _metadata, _on_meta, _Part, _seed, _write
from luna_stack.lora.format import LoraFactors
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


def flux_shallow(depth: int = 1, depth_single: int = 1) -> FluxConfig:
    """Flux.1-dev's full widths (ComfyUI's loader accepts no other) with few blocks: a file of about 0.6 B
    parameters that runs through ComfyUI's own loader on a CPU."""
    return dataclasses.replace(FLUX1_DEV, depth=depth, depth_single=depth_single)


def flux_part(
    variant: Variant, size: Size, seed: int, prefix: str = "", config: FluxConfig | None = None
) -> _Part:
    """The model part of a file; `config` (e.g. flux_shallow()) overrides the variant's and size's."""
    from diffusers import FluxTransformer2DModel

    config = config or flux_config(variant, size)
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
    config: FluxConfig | None = None,
) -> Path:
    """A standalone Flux.1 file (unet/ or diffusion_models/) in BFL naming, no prefix."""
    part = flux_part(variant, size, seed, config=config)
    return _write(Path(path), [part], dtype, _metadata("unet", f"flux-{variant}", size, seed))


def write_flux_small(folder: Path, seed: int = 0) -> dict[str, Path]:
    """unet/flux-dev-small.safetensors and unet/flux-schnell-small.safetensors (write_models_dir's)."""
    variants: tuple[Variant, ...] = ("dev", "schnell")
    return {
        f"flux_{v}": write_flux(folder / f"flux-{v}-small.safetensors", v, "small", seed) for v in variants
    }


LoraFormat = Literal["kohya", "bfl", "peft"]
_LORA_KEYS = {  # format -> (key prefix, down suffix, up suffix, module path separator)
    "kohya": ("lora_unet_", ".lora_down.weight", ".lora_up.weight", "_"),
    "bfl": ("diffusion_model.", ".lora_A.weight", ".lora_B.weight", "."),
    "peft": ("transformer.", ".lora_A.weight", ".lora_B.weight", "."),
}


def write_flux_lora(
    path: str | Path,
    shapes: Mapping[str, tuple[int, int]],
    fmt: LoraFormat,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
) -> dict[str, LoraFactors]:
    """A random LoRA over `shapes` (module path -> Linear weight [out, in]: BFL paths for kohya / bfl,
    diffusers paths for peft) in the format's key names; returns the factors per module path.

    kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` + `.alpha` (what kohya's sd-scripts
    write for Flux); bfl: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`; peft (diffusers'
    FluxPipeline.save_lora_weights): `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, alpha
    in the PEFT metadata. alpha=None: no alpha in the file (readers take alpha = rank)."""
    prefix, down_suffix, up_suffix, sep = _LORA_KEYS[fmt]
    gen = torch.Generator().manual_seed(seed)
    truth: dict[str, LoraFactors] = {}
    tensors: dict[str, Tensor] = {}
    for module, (out_dim, in_dim) in sorted(shapes.items()):
        down = torch.randn(rank, in_dim, generator=gen) / math.sqrt(in_dim)
        up = torch.randn(out_dim, rank, generator=gen) * (0.1 / math.sqrt(rank))
        truth[module] = LoraFactors(down, up, alpha)
        base = prefix + module.replace(".", sep)
        tensors[base + down_suffix], tensors[base + up_suffix] = down, up
        if fmt == "kohya":
            tensors[base + ".alpha"] = torch.tensor(alpha)
    metadata = (
        {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha})} if fmt == "peft" else None
    )
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return truth
