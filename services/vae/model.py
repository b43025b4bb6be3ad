"""A resident VAE: diffusers' AutoencoderKL built from a ComfyUI-layout file, run with ComfyUI's
conventions (LATENT raw [B,C,H/8,W/8]; IMAGE float [B,H,W,3] in 0..1; encode x*2-1, decode
clamp((x+1)/2, 0, 1); encode takes the posterior mean).

C is 4 for SD1.x / SDXL VAEs and 16 for Flux's and SD3's. Those two are one architecture (128 wide,
channel multipliers 1-2-4-4, 16 latent channels, no quant_conv / post_quant_conv), equal in every key
and shape, so a standalone file's family is only its channel count ("16ch"); inside an all-in-one
checkpoint the diffusion model beside it names the family ("flux", "sd3"). The latent stays raw either
way: Flux's scale 0.3611 / shift 0.1159 and SD3's 1.5305 / 0.0609 are the diffusion model's latent
format in ComfyUI (latent_formats.py), applied around sampling, never by the VAE.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from luna_stack.weights import checkpoint, ldm_layout
from luna_stack.wire.contract import VAE_SCALE
from luna_stack.wire.errors import ModelLoadError
from luna_stack.wire.tensors import dtype_name

from . import tiling

log = logging.getLogger(__name__)


@dataclass
class VaeModel:
    name: str
    path: Path
    family: str
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype
    upcast: bool = False  # fp16 overflowed (the SDXL VAE does) and the model now runs in fp32

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.vae.parameters())

    def describe(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "bytes": self.bytes,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "latent_channels": self.latent_channels,
            "upcast": self.upcast,
        }

    # -- raw forwards (NCHW in, NCHW out, float32) ---------------------------------------------------
    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.device, self.dtype)).sample.float()

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mode().float()

    def _guarded(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        """Run; if fp16 produced inf/NaN (the SDXL VAE overflows in fp16), switch this model to fp32."""
        out = fn(*args)
        if self.dtype == torch.float16 and not bool(torch.isfinite(out).all()):
            log.warning("VAE %s overflowed in fp16; upcasting it to fp32 for good", self.name)
            self.vae.to(torch.float32)
            self.dtype = torch.float32
            self.upcast = True
            out = fn(*args)
        return out

    # -- ComfyUI-convention operations -------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        out = self._guarded(self._decode_raw, latent)
        return torch.clamp((out + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).contiguous()  # NHWC on the device

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._guarded(self._encode_raw, crop_to_multiple(image).movedim(-1, 1) * 2.0 - 1.0)

    @torch.inference_mode()
    def decode_tiled(
        self,
        latent: torch.Tensor,
        tile_y: int,
        tile_x: int,
        overlap: int,
        on_tile: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Tile sizes and overlap in latent units, as ComfyUI's VAE.decode_tiled takes them."""
        latent = latent.to(self.device)

        def run() -> torch.Tensor:
            return tiling.three_pass(
                latent,
                self._decode_raw,
                tile_y=tile_y,
                tile_x=tile_x,
                overlap=overlap,
                scale=VAE_SCALE,
                out_channels=3,
                encode=False,
                on_tile=on_tile,
            )

        out = self._guarded(run)
        return torch.clamp((out + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).contiguous()  # NHWC on the device

    @torch.inference_mode()
    def encode_tiled(
        self,
        image: torch.Tensor,
        tile_y: int,
        tile_x: int,
        overlap: int,
        on_tile: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Tile sizes and overlap in pixels, as ComfyUI's VAE.encode_tiled takes them."""
        pixels = (crop_to_multiple(image).to(self.device).movedim(-1, 1) * 2.0 - 1.0).float()

        def run() -> torch.Tensor:
            return tiling.three_pass(
                pixels,
                self._encode_raw,
                tile_y=tile_y,
                tile_x=tile_x,
                overlap=overlap,
                scale=1 / VAE_SCALE,
                out_channels=self.latent_channels,
                encode=True,
                on_tile=on_tile,
            )

        return self._guarded(run)


def crop_to_multiple(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI's encode crop: centre-crop H and W to multiples of 8, keep the first 3 channels."""
    for dim in (1, 2):
        size = image.shape[dim]
        keep = (size // VAE_SCALE) * VAE_SCALE
        if keep != size:
            image = image.narrow(dim, (size % VAE_SCALE) // 2, keep)
    return image[..., :3]


def load_vae(name: str, path: Path, device: torch.device, dtype: torch.dtype) -> VaeModel:
    """Build the VAE found in a single-file checkpoint or a standalone vae/ file (LDM or diffusers names)."""
    info = checkpoint.detect(checkpoint.load_shapes(path))
    part = info.get("vae")
    if part is None:
        have = ", ".join(c.kind for c in info.components) or "nothing recognisable"
        raise ModelLoadError(
            f"{path.name} holds no VAE weights (it has {have})", hint="name a checkpoint or a file under vae/"
        )
    vae_sd = checkpoint.load_state_dict(path, prefix=part.prefix)
    if part.layout == "diffusers":
        vae_sd = ldm_layout.vae_diffusers_to_ldm(vae_sd)
    config = checkpoint.vae_config_from_state_dict(vae_sd)
    downscale = 2 ** (len(config["block_out_channels"]) - 1)
    if downscale != VAE_SCALE:
        raise ModelLoadError(
            f"{path.name}: a VAE that scales images by {downscale}, not {VAE_SCALE}",
            hint="only 8x image VAEs (SD1.x, SDXL, SD3, Flux) are served",
        )
    vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict(convert_ldm_vae_checkpoint(vae_sd, config), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"{path.name}: VAE weights do not fit the detected architecture: {exc}"
        ) from None
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules this VAE does not have.
    torch.nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)
    family = info.family if info.family != "unknown" else f"{config['latent_channels']}ch"
    model = VaeModel(name=name, path=path, family=family, vae=vae, device=device, dtype=dtype)
    log.info(
        "loaded VAE %s (%s, %.1f MB, %s on %s)",
        name,
        family,
        model.bytes / 1e6,
        dtype_name(dtype),
        device,
    )
    return model
