"""The VAE service: POST /v1/vae/{decode,encode,decode_tiled,encode_tiled}.
Concurrent requests for the same model, operation and shape run as one batch."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from luna_stack.config import Settings
from luna_stack.server.batcher import Batcher
from luna_stack.server.ipc import Sink
from luna_stack.server.resident import ResidentModels
from luna_stack.server.service import ModelService, Params, Tensors
from luna_stack.wire.errors import BadRequest, InvalidTensor, NotFound
from luna_stack.wire.tensors import require_tensor

from .model import SCALE, VaeModel, load_vae
from .settings import VaeSettings
from .tiling import three_pass_tiles

log = logging.getLogger(__name__)
FOLDERS = ("vae", "checkpoints")
OPS = ("decode", "encode", "decode_tiled", "encode_tiled")


@dataclass(frozen=True)
class _Work:
    tensor: torch.Tensor
    request_id: str | None
    sink: Sink


class VaeService(ModelService):
    kind = "vae"
    default_port = 8102

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.cfg = settings.of(VaeSettings)
        self.resident = ResidentModels(
            "vae", self.roots, FOLDERS, self.executor, self._load, load_on_demand=self.cfg.load_on_demand
        )
        self.batcher: Batcher[_Work, torch.Tensor] = Batcher(
            "vae",
            self._run_batch,
            self.executor,
            max_rows=self.cfg.max_batch,
            max_delay_ms=self.cfg.max_delay_ms,
            metrics=self.metrics,
        )
        self.oom_fallbacks = 0

    # -- models ---------------------------------------------------------------------------------------
    def _load(self, name: str) -> VaeModel:
        return load_vae(name, self.roots.resolve(name, FOLDERS), self.device, self.dtype)

    def models(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.resident]

    async def startup(self) -> None:
        for name in self.cfg.preload:
            await self.resident.get(name, preload=True)

    # -- requests -------------------------------------------------------------------------------------
    def _check_size(self, height: int, width: int) -> None:
        if height * width > self.cfg.max_pixels:
            raise InvalidTensor(
                f"image of {height}×{width} pixels exceeds vae.max_pixels={self.cfg.max_pixels}",
                hint="use decode_tiled/encode_tiled for larger images or raise the limit",
            )

    def _tiles(self, params: Params, unit: int) -> tuple[int, int, int]:
        """tile_y, tile_x, overlap in the op's input units, defaulting to the configured tile."""
        try:
            tile_x = int(params.get("tile_x", self.cfg.tile_size // unit))
            tile_y = int(params.get("tile_y", tile_x))
            overlap = int(params.get("overlap", self.cfg.tile_overlap // unit))
        except (TypeError, ValueError):
            raise BadRequest("tile_x, tile_y and overlap must be integers") from None
        if min(tile_x, tile_y) < 4 or overlap < 0 or overlap >= min(tile_x, tile_y) // 2:
            raise BadRequest(
                f"invalid tiling tile_x={tile_x} tile_y={tile_y} overlap={overlap}",
                hint="tiles need at least 4 units, and overlap < half the smallest tile side",
            )
        return tile_y, tile_x, overlap

    async def run_op(
        self, op: str, tensors: Tensors, params: Params, client: str, sink: Sink
    ) -> tuple[Tensors, Params]:
        if op not in OPS:
            raise NotFound(f"unknown VAE operation {op!r}", hint=f"one of {', '.join(OPS)}")
        model = await self.resident.get(params.get("model"))
        request_id = params.get("request_id")
        if op.startswith("decode"):
            latent = require_tensor(tensors, "latent", rank=4, dims={1: model.latent_channels})
            self._check_size(latent.shape[2] * SCALE, latent.shape[3] * SCALE)
            tiles = self._tiles(params, SCALE) if op == "decode_tiled" else None
            key: Hashable = (op, model.name, tuple(latent.shape[1:]), latent.dtype, tiles)
            out = await self.batcher.submit(
                key, _Work(latent, request_id, sink), rows=latent.shape[0], client=client
            )
            return {"image": out}, {"model": model.name}
        image = require_tensor(tensors, "image", rank=4)
        if image.shape[3] not in (3, 4):
            raise InvalidTensor(f"image must be [B,H,W,3] (or 4 with alpha), got shape {list(image.shape)}")
        if image.shape[1] < SCALE or image.shape[2] < SCALE:
            raise InvalidTensor(
                f"image of {image.shape[1]}×{image.shape[2]} is smaller than one latent pixel"
            )
        self._check_size(image.shape[1], image.shape[2])
        tiles = self._tiles(params, 1) if op == "encode_tiled" else None
        key = (op, model.name, tuple(image.shape[1:]), image.dtype, tiles)
        out = await self.batcher.submit(
            key, _Work(image, request_id, sink), rows=image.shape[0], client=client
        )
        return {"latent": out}, {"model": model.name}

    # -- compute thread -------------------------------------------------------------------------------
    def _run_batch(self, key: Hashable, items: Sequence[_Work]) -> list[torch.Tensor]:
        op, name, _shape, _dtype, tiles = key  # type: ignore[misc]
        model = self.resident.loaded(name)
        batch = torch.cat([w.tensor for w in items]).to(self.device)
        if op == "decode":
            out = self._decode_or_tile(model, batch)
        elif op == "encode":
            out = model.encode(batch)
        else:
            tile_y, tile_x, overlap = tiles
            height, width = (batch.shape[2], batch.shape[3]) if op == "decode_tiled" else batch.shape[1:3]
            per_image = three_pass_tiles(height, width, tile_y, tile_x, overlap, encode=op == "encode_tiled")
            tick = self.progress.tracker([w.request_id for w in items], per_image * batch.shape[0])
            if op == "decode_tiled":
                out = model.decode_tiled(batch, tile_y, tile_x, overlap, on_tile=tick)
            else:
                out = model.encode_tiled(batch, tile_y, tile_x, overlap, on_tile=tick)
        sizes = [w.tensor.shape[0] for w in items]
        name = "image" if op.startswith("decode") else "latent"
        return [w.sink.put(name, part) for w, part in zip(items, torch.split(out, sizes), strict=True)]

    def _decode_or_tile(self, model: VaeModel, latent: torch.Tensor) -> torch.Tensor:
        try:
            return model.decode(latent)
        except torch.OutOfMemoryError:
            pass  # retry outside the handler, so the failed attempt's tensors can be freed first
        self.oom_fallbacks += 1
        log.warning("VAE %s: out of memory decoding %s; retrying tiled", model.name, list(latent.shape))
        torch.cuda.empty_cache()
        tile = self.cfg.tile_size // SCALE
        return model.decode_tiled(latent, tile, tile, self.cfg.tile_overlap // SCALE)

    # -- status ---------------------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return self.batcher.depth

    def status(self) -> dict[str, Any]:
        b = self.batcher
        return {
            "batching": {
                "max_batch": b.max_rows,
                "max_delay_ms": b.max_delay * 1000,
                "batches": b.batches,
                "rows": b.rows_total,
                "largest_batch": b.largest_batch,
            },
            "oom_fallbacks": self.oom_fallbacks,
        }

    async def shutdown(self) -> None:
        await self.batcher.close()
        await super().shutdown()


def build(settings: Settings) -> VaeService:
    return VaeService(settings)
