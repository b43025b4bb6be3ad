"""A stand-in for ComfyUI's comfy.sd.VAE that decodes and encodes on the VAE service.

VAEDecode, VAEEncode, VAEDecodeTiled and VAEEncodeTiled call exactly these methods; the object needs no
ComfyUI import, so it also backs the Luna Shared VAE nodes. Every VAE the service serves compresses 8x
(SD1.x / SDXL: 4 latent channels; Flux / SD3: 16); the channel count is the service's answer for the file,
as comfy.sd.VAE reads it from the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from luna_stack.wire.contract import VAE_SCALE

from .errors import LunaStackError
from .progress import comfy_progress
from .remote import Services

SCALE = VAE_SCALE  # no temporal axis


class VaeProxy:
    downscale_ratio = SCALE
    upscale_ratio = SCALE
    latent_dim = 2
    output_channels = 3
    vae_dtype = torch.float32
    # ComfyUI's own defaults for decode_tiled (latent units) and encode_tiled (pixels).
    DECODE_TILE = (64, 64, 16)
    ENCODE_TILE = (512, 512, 64)

    def __init__(self, services: Services, model: str, latent_channels: int | None = None):
        self.services = services
        self.model = model
        self._latent_channels = latent_channels
        self.device = torch.device("cpu")
        self.output_device = torch.device("cpu")

    def __repr__(self) -> str:
        return f"VaeProxy({self.model!r})"

    @property
    def latent_channels(self) -> int:
        """4 or 16, asked of the service on first use (which loads the VAE there, as ComfyUI's VAELoader
        loads it), so a loader node costs nothing until something needs to know."""
        if self._latent_channels is None:
            self._latent_channels = int(self.services.vae_load(self.model)["latent_channels"])
        return self._latent_channels

    # -- what ComfyUI's nodes and model management ask ---------------------------------------------------
    def spacial_compression_decode(self) -> int:
        return SCALE

    def spacial_compression_encode(self) -> int:
        return SCALE

    def temporal_compression_decode(self) -> None:
        return None

    def temporal_compression_encode(self) -> None:
        return None

    def memory_used_decode(self, shape: Any, dtype: Any) -> int:
        return 0  # the service holds the memory, not this process

    def memory_used_encode(self, shape: Any, dtype: Any) -> int:
        return 0

    def throw_exception_if_invalid(self) -> None:
        return None

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Crop to a multiple of the compression, centred (ComfyUI's VAE does the same)."""
        h, w = (pixels.shape[1] // SCALE) * SCALE, (pixels.shape[2] // SCALE) * SCALE
        top, left = (pixels.shape[1] % SCALE) // 2, (pixels.shape[2] % SCALE) // 2
        return pixels[:, top : top + h, left : left + w, :]

    def get_sd(self) -> dict[str, torch.Tensor]:
        raise LunaStackError("a shared (Luna Stack) VAE has no local weights to save")

    # -- compute --------------------------------------------------------------------------------------------
    def decode(self, samples_in: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
        return self.services.vae_decode(self.model, samples_in).float()

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        return self.services.vae_encode(self.model, self.vae_encode_crop_pixels(pixel_samples)).float()

    def decode_tiled(
        self,
        samples: torch.Tensor,
        tile_x: int | None = None,
        tile_y: int | None = None,
        overlap: int | None = None,
        tile_t: int | None = None,
        overlap_t: int | None = None,
    ) -> torch.Tensor:
        tiles = _tiles((tile_x, tile_y, overlap), self.DECODE_TILE)
        return self.services.vae_decode(self.model, samples, tiles, comfy_progress()).float()

    def encode_tiled(
        self,
        pixel_samples: torch.Tensor,
        tile_x: int | None = None,
        tile_y: int | None = None,
        overlap: int | None = None,
        tile_t: int | None = None,
        overlap_t: int | None = None,
    ) -> torch.Tensor:
        tiles = _tiles((tile_x, tile_y, overlap), self.ENCODE_TILE)
        pixels = self.vae_encode_crop_pixels(pixel_samples)
        return self.services.vae_encode(self.model, pixels, tiles, comfy_progress()).float()


def _tiles(given: tuple[int | None, int | None, int | None], default: tuple[int, int, int]) -> dict[str, int]:
    tile_x, tile_y, overlap = (d if v is None else int(v) for v, d in zip(given, default, strict=True))
    return {"tile_x": tile_x, "tile_y": tile_y, "overlap": overlap}
