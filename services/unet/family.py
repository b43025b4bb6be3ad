"""The UNet family: POST /v1/unet/step (one sampling step, ComfyUI's diffusion_model call).

Step request: tensors `x` [B,C,H,W], `timesteps` [B], `context` [B,T,D], `y` [B,ADM] (SDXL), optional
`control.<input|middle|output>.<N>` residuals (see step.py); params `{"model": name, "lora": [{"name",
"strength"}], "control_lengths": {...}}`. Reply: tensor `out` in x's shape and dtype, params `model`
and `batch_rows` (rows in the forward this step ran in).

Concurrent steps with the same model, latent shape, dtype, context length and control slots are merged
into one forward; a request's rows (a cond/uncond pair) always stay together, and each request's LoRA
stack applies to its own rows only, beside the frozen weights. Every batch goes through the model's step
runner (step_runner.py): a captured CUDA graph of its (shape, batch bucket) where graphs are on, LoRA
stacks through the graph's static adapter bank; the same forward eager otherwise.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from luna_stack.config import Settings
from luna_stack.gpu.graph_config import parse_latents
from luna_stack.lora.cache import LoraCache
from luna_stack.lora.request import parse_stack
from luna_stack.lora.stack import LoraStack, resolve_stack
from luna_stack.server.family import (
    BatchPolicy,
    ModelFamily,
    OpRequest,
    OpSpec,
    Reply,
    ServiceContext,
    TensorSpec,
)
from luna_stack.server.ipc import Sink
from luna_stack.server.service import Service
from luna_stack.wire.contract import VAE_SCALE
from luna_stack.wire.errors import BadRequest, InvalidTensor, LimitExceeded
from luna_stack.wire.tensors import dtype_name, require_tensor

from .loader import LoadedUnet, load_unet
from .settings import UnetSettings
from .step import check_control, control_from_wire, input_block_shapes
from .step_runner import build_runner, step_shape, warm_up_shapes

log = logging.getLogger(__name__)
MIN_LATENT = 8  # latent pixels a side: below, the UNet's downsampling leaves nothing to upsample from
_STEP = OpSpec(
    "step",
    "one sampling step: ComfyUI's diffusion_model(x, timesteps, context, y, control)",
    (
        TensorSpec("x", "noisy latent [B,C,H,W] (scaled by the model's latent format)"),
        TensorSpec("timesteps", "[B] timesteps"),
        TensorSpec("context", "[B,T,D] text conditioning"),
        TensorSpec("y", "[B,ADM] SDXL: pooled text ++ size embeddings", optional=True),
        TensorSpec("control.", "ControlNet / T2I residuals control.<input|middle|output>.<N>", optional=True),
    ),
    (TensorSpec("out", "the model output in x's shape and dtype"),),
)


@dataclass(frozen=True)
class StepKey:
    model: str  # the model's path: one resident model
    shape: tuple[int, ...]  # one row of x
    dtype: torch.dtype
    context: int  # tokens
    control: tuple[str, ...]  # residual slots
    alone: int | None = None  # batching off: a unique number, so no two steps share a forward


@dataclass(frozen=True)
class Step:
    model: LoadedUnet
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None
    control: dict[str, torch.Tensor]  # slot -> residual (BlockResiduals.named())
    stack: LoraStack
    sink: Sink

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class UnetFamily(ModelFamily[LoadedUnet, Step]):
    kind = "unet"
    folders = ("unet", "diffusion_models", "checkpoints")  # diffusion_models/: ComfyUI's newer name for unet/
    takes_lora = True
    ops: ClassVar[Mapping[str, OpSpec]] = {"step": _STEP}

    section = UnetSettings
    cfg: UnetSettings

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        self.precision = self.cfg.precision if self.cfg.precision != "auto" else dtype_name(ctx.dtype)
        self.graph_cfg = self.cfg.graph
        self.graphs_on = self.graph_cfg.active_on(ctx.device)
        self._lora_caches: dict[torch.dtype, LoraCache] = {}
        self._unbatched = itertools.count()

    @property
    def batching(self) -> BatchPolicy:
        return BatchPolicy(
            self.cfg.max_batch,
            self.cfg.max_delay_ms if self.cfg.batching else 0.0,
            self.graph_cfg.buckets if self.graphs_on else None,
        )

    def load(self, name: str) -> LoadedUnet:
        model = load_unet(name, self.ctx.roots.resolve(name, self.folders), self.precision, self.ctx.device)
        log.info("loaded UNet %s (%s, %.1f MiB)", model.name, model.precision, model.nbytes / 2**20)
        model.runner = build_runner(
            model, self.graph_cfg, self.ctx.metrics.graph_forwards, graphs=self.graphs_on
        )
        if self.graphs_on and not self.graph_cfg.lazy:
            latents = parse_latents(self.cfg.graph_latents, "unet.graph_latents")
            model.runner.warm_up(warm_up_shapes(model, latents))
        return model

    # -- LoRA -----------------------------------------------------------------------------------------
    def _lora_cache(self, dtype: torch.dtype) -> LoraCache:
        # Adapters are kept in the compute dtype of the model they serve (fp8 models compute in bf16).
        if dtype not in self._lora_caches:
            self._lora_caches[dtype] = LoraCache(
                int(self.cfg.lora_cache_mb * 2**20),
                self.ctx.device,
                dtype,
                redis=self.ctx.redis,
                replica=self.ctx.replica_id,
            )
        return self._lora_caches[dtype]

    async def _lora_stack(self, model: LoadedUnet, spec: Any) -> LoraStack:
        files = parse_stack(spec, self.ctx.roots, self.cfg.max_loras)
        cache = self._lora_cache(model.dtype)
        return await resolve_stack(files, cache, {"unet": (model.unet, "unet")}, self.ctx.executor.run)

    # -- requests -------------------------------------------------------------------------------------
    async def serve(self, request: OpRequest[LoadedUnet]) -> Reply:
        model, tensors, params = request.model, request.tensors, request.params
        x = require_tensor(tensors, "x", rank=4, dims={1: model.in_channels})
        rows = x.shape[0]
        if rows > self.cfg.max_batch:
            raise BadRequest(
                f"a step of {rows} rows exceeds unet.max_batch={self.cfg.max_batch}",
                hint="split the batch or raise LUNA_UNET_MAX_BATCH",
            )
        if min(x.shape[2], x.shape[3]) < MIN_LATENT:
            raise InvalidTensor(
                f"a latent of {x.shape[2]}×{x.shape[3]} is smaller than {MIN_LATENT}×{MIN_LATENT}",
                hint=f"images of at least {MIN_LATENT * VAE_SCALE} pixels a side",
            )
        latent = rows * x.shape[2] * x.shape[3]
        if latent > self.cfg.max_latent_pixels:
            raise LimitExceeded(
                f"a step of {rows}×{x.shape[2]}×{x.shape[3]} latent pixels exceeds "
                f"unet.max_latent_pixels={self.cfg.max_latent_pixels}",
                hint="send fewer rows per step or raise LUNA_UNET_MAX_LATENT_PIXELS",
            )
        timesteps = require_tensor(tensors, "timesteps", rank=1, dims={0: rows})
        context = require_tensor(tensors, "context", rank=3, dims={0: rows, 2: model.context_dim})
        y = None
        if model.adm_channels is not None:
            y = require_tensor(tensors, "y", rank=2, dims={0: rows, 1: model.adm_channels})
        elif "y" in tensors:
            raise BadRequest(f"model {model.name} ({model.family}) takes no y")
        lengths = params.get("control_lengths")
        if lengths is not None and not isinstance(lengths, dict):
            raise BadRequest('params.control_lengths must be an object like {"output": 12}')
        control = control_from_wire(tensors, lengths, len(input_block_shapes(model.unet, 1, 1)))
        control = check_control(model.unet, control, x)
        stack = await self._lora_stack(model, params.get("lora"))
        step = Step(model, x, timesteps, context, y, control.named(), stack, request.sink)
        out, batch_rows = await request.compute(step)
        return Reply({"out": out}, {"model": model.name, "batch_rows": batch_rows})

    def batch_key(self, work: Step) -> Hashable:
        return StepKey(
            str(work.model.path),
            tuple(work.x.shape[1:]),
            work.x.dtype,
            work.context.shape[1],
            tuple(sorted(work.control)),
            None if self.cfg.batching else next(self._unbatched),
        )

    # -- compute thread -------------------------------------------------------------------------------
    def run_batch(self, works: Sequence[Step]) -> list[tuple[torch.Tensor, int]]:
        model = works[0].model
        slots = works[0].control  # the batch key holds the slot names: every item has the same
        parts = {
            "x": [s.x for s in works],
            "timesteps": [s.timesteps for s in works],
            "context": [s.context for s in works],
            **({"y": [s.y for s in works]} if model.adm_channels is not None else {}),
            **{f"control.{slot}": [s.control[slot] for s in works] for slot in slots},
        }
        shape = step_shape(works[0].x, works[0].context, slots)
        out = model.runner.run(shape, parts, [(s.rows, s.stack.part("unet")) for s in works])
        # A graph's output is a static buffer: every part is put (copied out) before the next replay.
        pieces = torch.split(out, [s.rows for s in works])
        rows = out.shape[0]
        return [(s.sink.put("out", p.to(s.x.dtype)), rows) for p, s in zip(pieces, works, strict=True)]

    # -- status ---------------------------------------------------------------------------------------
    def status(self, models: Sequence[LoadedUnet]) -> dict[str, Any]:
        caches = {dtype_name(d): vars(c.stats()) for d, c in self._lora_caches.items()}
        runners = [m.runner for m in models if self.graphs_on]
        return {
            "precision": self.precision,
            "batching_enabled": self.cfg.batching,
            "lora_cache": caches,
            "graphs": self.graph_cfg.status(self.ctx.device, runners),
        }


def build(settings: Settings) -> Service:
    """The unet service: the server around this family (what `luna-stack serve unet` runs)."""
    return Service(settings, UnetFamily)
