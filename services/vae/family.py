"""The VAE family: POST /v1/vae/{decode,encode,decode_tiled,encode_tiled}.

Requests for the same model, operation, shape, dtype and tiling run as one batch. A decode that runs out
of GPU memory is retried tiled."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from luna_stack.config import Settings
from luna_stack.server.family import (
    ModelFamily,
    OpRequest,
    OpSpec,
    Params,
    Reply,
    ServiceContext,
    TensorSpec,
)
from luna_stack.server.ipc import Sink
from luna_stack.server.service import Service
from luna_stack.wire.contract import VAE_SCALE
from luna_stack.wire.errors import BadRequest, ClientGone, InvalidTensor, LimitExceeded, Unavailable
from luna_stack.wire.tensors import require_tensor

from .model import VaeModel, load_vae
from .settings import VaeSettings
from .tiling import three_pass_tiles

log = logging.getLogger(__name__)
_LATENT = TensorSpec("latent", "raw (unscaled) latent [B,C,H/8,W/8], ComfyUI's LATENT samples")
_IMAGE = TensorSpec("image", "IMAGE [B,H,W,3] in 0..1 (a 4th alpha channel is dropped)")
_TILING = " Params tile_x, tile_y, overlap in the input's units; request_id for progress."
MIN_TILE = 64  # pixels: ComfyUI's VAEDecodeTiled / VAEEncodeTiled minimum


def _integer(value: Any, name: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != value
        or abs(value) > 1 << 20
    ):
        raise BadRequest(f"{name} must be an integer number of units, got {value!r}")
    return int(value)


# Which models make latents of each channel count, for the mismatch message.
_LATENT_MAKERS = {4: "SD1.x / SDXL", 16: "Flux / SD3"}


def _check_channels(model: VaeModel, latent: torch.Tensor) -> None:
    """A latent of another model family (4 vs 16 channels) is the user's wiring mistake: say so."""
    want, got = model.latent_channels, latent.shape[1]
    if got == want:
        return
    made_by = _LATENT_MAKERS.get(got)
    raise InvalidTensor(
        f"VAE {model.name} ({model.family}) decodes {want}-channel latents; this latent has {got} channels "
        f"(shape {list(latent.shape)})",
        hint=(
            f"{got}-channel latents come from {made_by} models: decode with such a model's VAE"
            if made_by
            else f"this VAE takes latents [B, {want}, H/8, W/8]"
        ),
        details={"vae_latent_channels": want, "latent_channels": got},
    )


@dataclass(frozen=True)
class Tiling:
    tile_y: int
    tile_x: int
    overlap: int


@dataclass(frozen=True)
class VaeKey:
    op: str
    model: str
    shape: tuple[int, ...]  # one row's shape
    dtype: torch.dtype
    tiling: Tiling | None


@dataclass(frozen=True)
class VaeWork:
    op: str
    model: VaeModel
    tensor: torch.Tensor
    tiling: Tiling | None
    request_id: str | None
    sink: Sink
    abandoned: Callable[[], bool]

    @property
    def rows(self) -> int:
        return self.tensor.shape[0]


class VaeFamily(ModelFamily[VaeModel, VaeWork]):
    kind = "vae"
    folders = ("vae", "checkpoints")
    ops: ClassVar[Mapping[str, OpSpec]] = {
        "decode": OpSpec("decode", "latent -> image", (_LATENT,), (_IMAGE,)),
        "encode": OpSpec("encode", "image -> latent", (_IMAGE,), (_LATENT,)),
        "decode_tiled": OpSpec(
            "decode_tiled", "latent -> image, tile by tile." + _TILING, (_LATENT,), (_IMAGE,)
        ),
        "encode_tiled": OpSpec(
            "encode_tiled", "image -> latent, tile by tile." + _TILING, (_IMAGE,), (_LATENT,)
        ),
    }

    section = VaeSettings
    cfg: VaeSettings

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        self.oom_fallbacks = 0

    def load(self, name: str) -> VaeModel:
        return load_vae(name, self.ctx.roots.resolve(name, self.folders), self.ctx.device, self.ctx.dtype)

    # -- requests -------------------------------------------------------------------------------------
    def _check_pixels(self, rows: int, height: int, width: int, tiled: bool) -> None:
        limit, key = (
            (self.cfg.max_tiled_pixels, "max_tiled_pixels") if tiled else (self.cfg.max_pixels, "max_pixels")
        )
        if rows * height * width > limit:
            raise LimitExceeded(
                f"{rows} image(s) of {height}×{width} pixels exceed vae.{key}={limit} pixels per request",
                hint=("use decode_tiled/encode_tiled for larger images, " if not tiled else "")
                + f"send fewer images per request or raise LUNA_VAE_{key.upper()}",
            )

    def _tiling(self, params: Params, unit: int) -> Tiling:
        """tile_y, tile_x, overlap in the op's input units (latent pixels for decode, pixels for encode),
        defaulting to the configured tile. Tiles are at least MIN_TILE pixels, as ComfyUI's nodes allow."""
        tile_x = _integer(params.get("tile_x", self.cfg.tile_size // unit), "tile_x")
        tile_y = _integer(params.get("tile_y", tile_x), "tile_y")
        overlap = _integer(params.get("overlap", self.cfg.tile_overlap // unit), "overlap")
        smallest = MIN_TILE // unit
        if min(tile_x, tile_y) < smallest or overlap < 0 or overlap >= min(tile_x, tile_y) // 2:
            raise BadRequest(
                f"invalid tiling tile_x={tile_x} tile_y={tile_y} overlap={overlap}",
                hint=f"tiles need at least {smallest} units ({MIN_TILE} pixels), and 0 <= overlap < half the "
                "smallest tile side",
            )
        return Tiling(tile_y, tile_x, overlap)

    def _check_tiles(self, rows: int, height: int, width: int, tiling: Tiling, encode: bool) -> None:
        per_image = three_pass_tiles(
            height, width, tiling.tile_y, tiling.tile_x, tiling.overlap, encode=encode
        )
        if per_image * rows > self.cfg.max_tiles:
            raise LimitExceeded(
                f"this tiling runs {per_image * rows} tiles; vae.max_tiles={self.cfg.max_tiles}",
                hint="use larger tiles or raise LUNA_VAE_MAX_TILES",
            )

    async def serve(self, request: OpRequest[VaeModel]) -> Reply:
        op, model, tensors, params = request.op, request.model, request.tensors, request.params
        tiled = op.endswith("_tiled")
        if op.startswith("decode"):
            tensor = require_tensor(tensors, "latent", rank=4)
            _check_channels(model, tensor)
            rows, height, width = tensor.shape[0], tensor.shape[2], tensor.shape[3]
            self._check_pixels(rows, height * VAE_SCALE, width * VAE_SCALE, tiled)
            tiling = self._tiling(params, VAE_SCALE) if tiled else None
            output = "image"
        else:
            tensor = require_tensor(tensors, "image", rank=4)
            if tensor.shape[3] not in (3, 4):
                raise InvalidTensor(
                    f"image must be [B,H,W,3] (or 4 with alpha), got shape {list(tensor.shape)}"
                )
            rows, height, width = tensor.shape[0], tensor.shape[1], tensor.shape[2]
            if height < VAE_SCALE or width < VAE_SCALE:
                raise InvalidTensor(f"image of {height}×{width} is smaller than one latent pixel")
            self._check_pixels(rows, height, width, tiled)
            tiling = self._tiling(params, 1) if tiled else None
            output = "latent"
        if tiling is not None:
            self._check_tiles(rows, height, width, tiling, encode=output == "latent")
        request_id = params.get("request_id")
        if request_id is not None and not (isinstance(request_id, str) and 0 < len(request_id) <= 128):
            raise BadRequest("params.request_id must be a string of 1 to 128 characters")
        work = VaeWork(op, model, tensor, tiling, request_id, request.sink, request.abandoned)
        return Reply({output: await request.compute(work)}, {"model": model.name})

    def batch_key(self, work: VaeWork) -> Hashable:
        return VaeKey(work.op, work.model.name, tuple(work.tensor.shape[1:]), work.tensor.dtype, work.tiling)

    # -- compute thread -------------------------------------------------------------------------------
    def run_batch(self, works: Sequence[VaeWork]) -> list[torch.Tensor]:
        first = works[0]
        op, model, tiling = first.op, first.model, first.tiling
        batch = torch.cat([w.tensor for w in works]).to(self.ctx.device)
        if op == "decode":
            out = self._decode_or_tile(model, batch)
        elif op == "encode":
            out = model.encode(batch)
        else:
            assert tiling is not None
            decode = op == "decode_tiled"
            height, width = (batch.shape[2], batch.shape[3]) if decode else batch.shape[1:3]
            per_image = three_pass_tiles(
                height, width, tiling.tile_y, tiling.tile_x, tiling.overlap, encode=not decode
            )
            progress = self.ctx.progress.tracker([w.request_id for w in works], per_image * batch.shape[0])

            def tick() -> None:
                progress()
                if self.ctx.executor.stopping.is_set():
                    raise Unavailable("the service is shutting down", hint="send the request again")
                if all(w.abandoned() for w in works):
                    raise ClientGone("every client of this tiled batch has gone: stopped between tiles")

            run = model.decode_tiled if decode else model.encode_tiled
            out = run(batch, tiling.tile_y, tiling.tile_x, tiling.overlap, on_tile=tick)
        sizes = [w.rows for w in works]
        name = "image" if op.startswith("decode") else "latent"
        return [w.sink.put(name, part) for w, part in zip(works, torch.split(out, sizes), strict=True)]

    def _decode_or_tile(self, model: VaeModel, latent: torch.Tensor) -> torch.Tensor:
        try:
            return model.decode(latent)
        except torch.OutOfMemoryError:
            pass  # retry outside the handler, so the failed attempt's tensors can be freed first
        self.oom_fallbacks += 1
        log.warning("VAE %s: out of memory decoding %s; retrying tiled", model.name, list(latent.shape))
        torch.cuda.empty_cache()
        tile = self.cfg.tile_size // VAE_SCALE
        return model.decode_tiled(latent, tile, tile, self.cfg.tile_overlap // VAE_SCALE)

    def status(self, models: Sequence[VaeModel]) -> dict[str, Any]:
        return {"oom_fallbacks": self.oom_fallbacks}


def build(settings: Settings) -> Service:
    """The vae service: the server around this family (what `luna-stack serve vae` runs)."""
    return Service(settings, VaeFamily)
