"""The unet family: POST /v1/unet/step (one sampling step, ComfyUI's diffusion_model call), for every
diffusion architecture (arch.py: SD1.5/SDXL UNets, Flux and SD3 DiTs).

Step request: tensors `x` [B,C,H,W] and what the model's architecture takes (SD: `timesteps`, `context`,
`y`, `control.*`; Flux: `timesteps`, `context`, `y`, `guidance`, `control.*`; SD3: `timesteps`, `context`,
`y`); params `{"model": name, "lora": [{"name", "strength"}], ...}`. Reply: tensor `out` in x's shape and
dtype, params `model`, `family` and `batch_rows` (rows in the forward this step ran in).

Concurrent steps of the same model whose inputs have the same shape (StepInputs.shape: latent size,
context length, control slots) and dtype are merged into one forward; a request's rows (a cond/uncond
pair) always stay together, and each request's LoRA stack applies to its own rows only, beside the frozen
weights. Every batch goes through the model's step runner (step_runner.py): a captured CUDA graph of its
(shape, batch bucket) where graphs are on and one is captured (by default while the service is idle,
`background_work`), the same forward eager otherwise.
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
from luna_stack.gpu.graphs import capture_one
from luna_stack.lora.cache import LoraCache
from luna_stack.lora.request import parse_stack
from luna_stack.lora.stack import LoraStack, resolve_stack
from luna_stack.server.family import (
    BatchPolicy,
    IdlePolicy,
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

from .arch import DiffusionModel, StepInputs
from .loader import load_diffusion_model
from .settings import UnetSettings
from .step_runner import build_runner

log = logging.getLogger(__name__)
_STEP = OpSpec(
    "step",
    "one sampling step: ComfyUI's diffusion_model(x, timesteps, context, y, guidance, control)",
    (
        TensorSpec("x", "noisy latent [B,C,H,W] (scaled by the model's latent format)"),
        TensorSpec("timesteps", "[B] timesteps (SD: 0..999; Flux: sigma; SD3: sigma×1000)"),
        TensorSpec("context", "[B,T,D] text conditioning"),
        TensorSpec("y", "[B,ADM] SDXL: pooled ++ size embeddings; Flux / SD3: pooled text", optional=True),
        TensorSpec("guidance", "[B] Flux.1-dev: the distilled guidance scale", optional=True),
        TensorSpec("control.", "ControlNet / T2I residuals control.<input|middle|output>.<N>", optional=True),
    ),
    (TensorSpec("out", "the model output in x's shape and dtype"),),
)


@dataclass(frozen=True)
class StepKey:
    model: str  # the model's path: one resident model
    shape: Hashable  # StepInputs.shape: everything the forward is specialised to besides rows
    dtype: torch.dtype  # x's: the reply's dtype
    alone: int | None = None  # batching off: a unique number, so no two steps share a forward


@dataclass(frozen=True)
class Step:
    model: DiffusionModel
    inputs: StepInputs
    stack: LoraStack
    sink: Sink

    @property
    def x(self) -> torch.Tensor:
        return self.inputs.tensors["x"]

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class UnetFamily(ModelFamily[DiffusionModel, Step]):
    kind = "unet"
    folders = ("unet", "diffusion_models", "checkpoints")  # diffusion_models/: ComfyUI's newer name for unet/
    takes_lora = True
    ops: ClassVar[Mapping[str, OpSpec]] = {"step": _STEP}

    section = UnetSettings
    cfg: UnetSettings

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        self.precision = self.cfg.precision if self.cfg.precision != "auto" else dtype_name(ctx.dtype)
        self.arch_precision = {"flux": self._flux_precision(ctx.device)}
        self.graph_cfg = self.cfg.graph
        self.graphs_on = self.graph_cfg.active_on(ctx.device)
        self._lora_caches: dict[torch.dtype, LoraCache] = {}
        self._unbatched = itertools.count()

    def _flux_precision(self, device: torch.device) -> str:
        if self.cfg.flux_precision != "auto":
            return self.cfg.flux_precision
        if self.cfg.precision != "auto" or device.type != "cuda":
            return self.precision
        return "bf16"

    @property
    def batching(self) -> BatchPolicy:
        return BatchPolicy(
            self.cfg.max_batch,
            self.cfg.max_delay_ms if self.cfg.batching else 0.0,
            self.graph_cfg.buckets if self.graphs_on else None,
        )

    def load(self, name: str) -> DiffusionModel:
        path = self.ctx.roots.resolve(name, self.folders)
        model = load_diffusion_model(name, path, self.precision, self.ctx.device, self.arch_precision)
        log.info(
            "loaded %s model %s (%s, %.1f MiB, %.1f s)",
            model.family,
            model.name,
            model.precision,
            model.nbytes / 2**20,
            model.load_seconds,
        )
        model.runner = build_runner(
            model, self.graph_cfg, self.ctx.metrics.graph_forwards, graphs=self.graphs_on
        )
        latents = parse_latents(self.cfg.graph_latents, "unet.graph_latents")
        if self.graphs_on and self.graph_cfg.capture == "start":
            model.runner.warm_up(model.warm_up_shapes(latents), lora=False)  # before the model is ready
        elif self.graphs_on and self.graph_cfg.background and latents:
            model.runner.plan(model.warm_up_shapes(latents))  # after what traffic asks for
        return model

    @property
    def idle_policy(self) -> IdlePolicy:
        return IdlePolicy(self.graph_cfg.idle_ms, self.graph_cfg.release_idle_s)

    def background_work(self, models: Sequence[DiffusionModel]) -> bool:
        return self.graphs_on and capture_one(m.runner for m in models)

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

    async def _lora_stack(self, model: DiffusionModel, spec: Any) -> LoraStack:
        files = parse_stack(spec, self.ctx.roots, self.cfg.max_loras)
        cache = self._lora_cache(model.dtype)
        return await resolve_stack(files, cache, {"unet": (model.module, "unet")}, self.ctx.executor.run)

    # -- requests -------------------------------------------------------------------------------------
    async def serve(self, request: OpRequest[DiffusionModel]) -> Reply:
        model, tensors, params = request.model, request.tensors, request.params
        x = require_tensor(tensors, "x", rank=4, dims={1: model.in_channels})
        rows = x.shape[0]
        if rows > self.cfg.max_batch:
            raise BadRequest(
                f"a step of {rows} rows exceeds unet.max_batch={self.cfg.max_batch}",
                hint="split the batch or raise LUNA_UNET_MAX_BATCH",
            )
        side = model.min_latent
        if min(x.shape[2], x.shape[3]) < side:
            raise InvalidTensor(
                f"a latent of {x.shape[2]}×{x.shape[3]} is smaller than {side}×{side}",
                hint=f"images of at least {side * VAE_SCALE} pixels a side",
            )
        latent = rows * x.shape[2] * x.shape[3]
        if latent > self.cfg.max_latent_pixels:
            raise LimitExceeded(
                f"a step of {rows}×{x.shape[2]}×{x.shape[3]} latent pixels exceeds "
                f"unet.max_latent_pixels={self.cfg.max_latent_pixels}",
                hint="send fewer rows per step or raise LUNA_UNET_MAX_LATENT_PIXELS",
            )
        inputs = model.parse_step(tensors, params)
        stack = await self._lora_stack(model, params.get("lora"))
        out, batch_rows = await request.compute(Step(model, inputs, stack, request.sink))
        return Reply({"out": out}, {"model": model.name, "family": model.family, "batch_rows": batch_rows})

    def batch_key(self, work: Step) -> Hashable:
        return StepKey(
            str(work.model.path),
            work.inputs.shape,
            work.x.dtype,
            None if self.cfg.batching else next(self._unbatched),
        )

    # -- compute thread -------------------------------------------------------------------------------
    def run_batch(self, works: Sequence[Step]) -> list[tuple[torch.Tensor, int]]:
        model = works[0].model
        # Equal shapes have equal input names (the batch key holds the shape).
        parts = {name: [s.inputs.tensors[name] for s in works] for name in works[0].inputs.tensors}
        out = model.runner.run(works[0].inputs.shape, parts, [(s.rows, s.stack.part("unet")) for s in works])
        # A graph's output is a static buffer: every part is put (copied out) before the next replay.
        pieces = torch.split(out, [s.rows for s in works])
        rows = out.shape[0]
        return [(s.sink.put("out", p.to(s.x.dtype)), rows) for p, s in zip(pieces, works, strict=True)]

    # -- status ---------------------------------------------------------------------------------------
    def status(self, models: Sequence[DiffusionModel]) -> dict[str, Any]:
        caches = {dtype_name(d): vars(c.stats()) for d, c in self._lora_caches.items()}
        runners = [m.runner for m in models if self.graphs_on]
        return {
            "precision": self.precision,
            "precision_by_architecture": self.arch_precision,
            "batching_enabled": self.cfg.batching,
            "lora_cache": caches,
            "graphs": self.graph_cfg.status(self.ctx.device, runners),
        }


def build(settings: Settings) -> Service:
    """The unet service: the server around this family (what `luna-stack serve unet` runs)."""
    return Service(settings, UnetFamily)
