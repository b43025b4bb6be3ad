"""Random-weight 16-channel VAEs: Flux's `ae.safetensors` and SD3's VAE, full size or small.

Both are one architecture: the SD VAE (128 wide, channel multipliers 1-2-4-4, 8x downscale) with 16
latent channels and no quant_conv / post_quant_conv. Flux ships it as `ae.safetensors` in BFL naming,
which is the LDM naming (`encoder.down.N...`, `decoder.up.N...`); SD3 keeps it under `first_stage_model.`
of its all-in-one checkpoints (LDM naming) and as diffusers' `vae/diffusion_pytorch_model.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from luna_stack.devtools.fixtures import (
    Size,
    _build,
    _file_layout,
    _metadata,
    _on_meta,
    _Part,
    _seed,
    _write,
    vae_config,
)
from luna_stack.weights import ldm_layout

Tensor = torch.Tensor
Vae16Family = Literal["flux", "sd3"]
VaeLayout = Literal["ldm", "diffusers"]
LATENT_CHANNELS = 16


def vae16_config(size: Size) -> dict[str, Any]:
    """diffusers AutoencoderKL kwargs of the Flux / SD3 VAE: the 4-channel VAE's widths of that size (small:
    narrow, still four levels = 8x), 16 latent channels, no quant convs."""
    return {
        **vae_config(size),
        "latent_channels": LATENT_CHANNELS,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def vae16_part(size: Size, seed: int, prefix: str, layout: VaeLayout = "ldm") -> _Part:
    """The VAE as one part of a file, for writers of all-in-one Flux (`vae.`) / SD3 (`first_stage_model.`)
    checkpoints."""
    from diffusers import AutoencoderKL

    config = vae16_config(size)
    blocks = len(config["block_out_channels"])
    return _Part(
        build=_on_meta(lambda: AutoencoderKL(**config)),
        rename=(lambda sd: ldm_layout.vae_diffusers_to_ldm(sd, blocks)) if layout == "ldm" else dict,
        prefix=prefix,
        seed=_seed(seed, "vae"),
    )


def write_vae16(
    path: str | Path,
    family: Vae16Family = "flux",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    layout: VaeLayout = "ldm",
    prefix: str = "",
) -> Path:
    """A 16-channel VAE: Flux's ae.safetensors is `layout="ldm"` (BFL naming), no prefix; SD3's standalone
    diffusers file is `layout="diffusers"`; the VAE part of an SD3 checkpoint is
    `prefix="first_stage_model."`, of a Flux one `prefix="vae."`. One seed, the same weights in every
    layout."""
    part = vae16_part(size, seed, prefix, layout)
    return _write(Path(path), [part], dtype, _metadata("vae", family, size, seed))


def vae16_shapes(
    size: Size = "full", prefix: str = "", layout: VaeLayout = "ldm", dtype: torch.dtype = torch.float16
) -> dict[str, Tensor]:
    """The keys write_vae16 would write, as meta tensors: a full-size layout without the bytes."""
    return _file_layout(_build([vae16_part(size, 0, prefix, layout)]), dtype)


def write_vae16_files(root: Path, size: Size, seed: int, dtype: torch.dtype) -> dict[str, Path]:
    """vae/flux-<size>-ae.safetensors (BFL naming) and vae/sd3-<size>-vae.safetensors (diffusers naming)."""
    vae = root / "vae"
    return {
        "flux_vae": write_vae16(vae / f"flux-{size}-ae.safetensors", "flux", size, seed, dtype, "ldm"),
        "sd3_vae": write_vae16(vae / f"sd3-{size}-vae.safetensors", "sd3", size, seed, dtype, "diffusers"),
    }


def demo_row() -> str:
    """The README demo-models table's row for the files write_vae16_files writes (size small)."""
    config = vae16_config("small")
    return (
        "| `vae/flux-small-ae.safetensors`, `vae/sd3-small-vae.safetensors` | Flux's / SD3's 16-channel VAE "
        "(BFL / diffusers naming) | AutoencoderKL, channels "
        f"{config['block_out_channels']}, no quant convs: IMAGE [B, H, W, 3] <-> latent "
        f"[B, {config['latent_channels']}, H/8, W/8] |"
    )
