"""The UNet service: POST /v1/unet/step (one sampling step, ComfyUI's diffusion_model call), load/unload,
GET /v1/unet/models, DELETE /v1/unet/models/{name}.

Step request: tensors `x` [B,C,H,W], `timesteps` [B], `context` [B,T,D], `y` [B,ADM] (SDXL), optional
`control.<input|middle|output>.<N>` residuals (see step.py); params `{"model": name, "lora": [{"name",
"strength"}], "control_lengths": {...}}`. Reply: tensor `out` in x's shape and dtype, params `model`
and `batch_rows` (rows in the forward this step ran in).

Concurrent steps with the same model, latent shape, dtype, context length and control slots are merged
into one forward; a request's rows (a cond/uncond pair) always stay together, and each request's LoRA
stack applies to its own rows only, beside the frozen weights.

On CUDA the forward replays a captured graph of its (shape, batch bucket), LoRA stacks through the
graph's static adapter bank (step_graphs.py, core/graphs.py); what does not fit runs eager.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from aiohttp import web

from luna_stack.config import Settings
from luna_stack.gpu.graph_config import parse_latents
from luna_stack.jobs.redis import connect
from luna_stack.lora import LoraCache, ResolvedLora, attach_side_paths, row_groups
from luna_stack.lora.request import parse_stack
from luna_stack.server.batcher import Batcher
from luna_stack.server.ipc import Sink
from luna_stack.server.resident import ResidentModels
from luna_stack.server.service import ModelService, Params, Tensors
from luna_stack.wire.errors import BadRequest, NotFound
from luna_stack.wire.tensors import dtype_name, require_tensor

from .loader import LoadedUnet, load_unet
from .settings import UnetSettings
from .step import BlockResiduals, check_control, control_from_wire, input_block_shapes, unet_forward
from .step_graphs import build_runner, step_shape, warm_up_shapes

log = logging.getLogger(__name__)
FOLDERS = ("unet", "checkpoints")
OPS = ("step",)
_STEP_TENSORS = {"x", "timesteps", "context", "y"}


@dataclass(frozen=True)
class _Step:
    model: LoadedUnet
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None
    control: dict[str, torch.Tensor]  # slot -> residual (BlockResiduals.named())
    stack: tuple[tuple[ResolvedLora, float], ...]
    sink: Sink

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class UnetService(ModelService):
    kind = "unet"
    default_port = 8103

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.cfg = settings.of(UnetSettings)
        self.precision = self.cfg.precision if self.cfg.precision != "auto" else dtype_name(self.dtype)
        self.resident = ResidentModels(
            "unet", self.roots, FOLDERS, self.executor, self._load, load_on_demand=self.cfg.load_on_demand
        )
        self._lora_caches: dict[torch.dtype, LoraCache] = {}
        self._redis: Any = None
        self._unbatched = itertools.count()
        self.graph_cfg = self.cfg.graph
        self.graphs_on = self.graph_cfg.active_on(self.device)
        self.batcher: Batcher[_Step, tuple[torch.Tensor, int]] = Batcher(
            "unet",
            self._run_batch,
            self.executor,
            max_rows=self.cfg.max_batch,
            max_delay_ms=self.cfg.max_delay_ms if self.cfg.batching else 0.0,
            metrics=self.metrics,
            buckets=self.graph_cfg.buckets if self.graphs_on else None,
        )

    # -- models ---------------------------------------------------------------------------------------
    def _load(self, name: str) -> LoadedUnet:
        model = load_unet(name, self.roots.resolve(name, FOLDERS), self.precision, self.device)
        attach_side_paths(model.unet)
        log.info("loaded UNet %s (%s, %.1f MiB)", model.name, model.precision, model.nbytes / 2**20)
        if self.graphs_on:
            model.graphs = build_runner(model, self.graph_cfg, self.metrics.graph_forwards)
            if not self.graph_cfg.lazy:
                latents = parse_latents(self.cfg.graph_latents, "unet.graph_latents")
                model.graphs.warm_up(warm_up_shapes(model, latents))
        return model

    def models(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.resident]

    async def startup(self) -> None:
        if self.settings.core.redis_url:
            self._redis = connect(self.settings.core.redis_url)
        for name in self.cfg.preload:
            await self.resident.get(name, preload=True)

    # -- LoRA -----------------------------------------------------------------------------------------
    def _lora_cache(self, dtype: torch.dtype) -> LoraCache:
        # Adapters are kept in the compute dtype of the model they serve (fp8 models compute in bf16).
        if dtype not in self._lora_caches:
            self._lora_caches[dtype] = LoraCache(
                int(self.cfg.lora_cache_mb * 2**20),
                self.device,
                dtype,
                redis=self._redis,
                replica=self.replica_id,
            )
        return self._lora_caches[dtype]

    async def _lora_stack(self, model: LoadedUnet, spec: Any) -> tuple[tuple[ResolvedLora, float], ...]:
        cache = self._lora_cache(model.dtype)
        stack = []
        for path, strength in parse_stack(spec, self.roots, self.cfg.max_loras):
            resolved = await cache.aresolve(path, model.unet, "unet", self.executor.run)
            stack.append((resolved, strength))
        return tuple(stack)

    # -- requests -------------------------------------------------------------------------------------
    async def run_op(
        self, op: str, tensors: Tensors, params: Params, client: str, sink: Sink
    ) -> tuple[Tensors, Params]:
        if op != "step":
            raise NotFound(f"unknown UNet operation {op!r}", hint=f"one of {', '.join(OPS)}")
        step = await self._parse_step(tensors, params, sink)
        key: Hashable = (
            step.model.path,
            tuple(step.x.shape[1:]),
            step.x.dtype,
            step.context.shape[1],
            tuple(sorted(step.control)),
        )
        if not self.cfg.batching:
            key = (*key, next(self._unbatched))
        out, rows = await self.batcher.submit(key, step, rows=step.rows, client=client)
        return {"out": out}, {"model": step.model.name, "batch_rows": rows}

    async def _parse_step(self, tensors: Tensors, params: Params, sink: Sink) -> _Step:
        model = await self.resident.get(params.get("model"))
        unknown = sorted(n for n in tensors if n not in _STEP_TENSORS and not n.startswith("control."))
        if unknown:
            raise BadRequest(f"unexpected tensors {unknown}", hint="x, timesteps, context, y, control.*")
        x = require_tensor(tensors, "x", rank=4, dims={1: model.in_channels})
        rows = x.shape[0]
        if rows > self.cfg.max_batch:
            raise BadRequest(
                f"a step of {rows} rows exceeds unet.max_batch={self.cfg.max_batch}",
                hint="split the batch or raise LUNA_UNET_MAX_BATCH",
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
        check_control(model.unet, control, x)
        stack = await self._lora_stack(model, params.get("lora"))
        return _Step(model, x, timesteps, context, y, control.named(), stack, sink)

    # -- compute thread -------------------------------------------------------------------------------
    def _run_batch(self, key: Hashable, items: Sequence[_Step]) -> list[tuple[torch.Tensor, int]]:
        model = items[0].model
        stacks = [(s.rows, s.stack) for s in items]
        slots = items[0].control  # the batch key holds the slot names: every item has the same
        inputs = {
            "x": [s.x for s in items],
            "timesteps": [s.timesteps for s in items],
            "context": [s.context for s in items],
            **({"y": [s.y for s in items]} if model.adm_channels is not None else {}),
            **{f"control.{slot}": [s.control[slot] for s in items] for slot in slots},
        }

        def eager() -> torch.Tensor:
            def cat(name: str, dtype: torch.dtype = model.dtype) -> torch.Tensor:
                return torch.cat(inputs[name]).to(device=model.device, dtype=dtype)  # type: ignore[arg-type]

            y = cat("y") if "y" in inputs else None
            control = BlockResiduals.from_named({slot: cat(f"control.{slot}") for slot in slots})
            with torch.inference_mode(), attach_side_paths(model.unet).plan(row_groups(stacks)):
                return unet_forward(
                    model.unet, cat("x"), cat("timesteps", torch.float32), cat("context"), y, control
                )

        if model.graphs is None:
            out = eager()
        else:
            shape = step_shape(items[0].x, items[0].context, slots)
            out = model.graphs.run(shape, inputs, stacks, eager)
        # A graph's output is a static buffer: every part is put (copied out) before the next replay.
        parts = torch.split(out, [s.rows for s in items])
        rows = out.shape[0]
        return [(s.sink.put("out", part.to(s.x.dtype)), rows) for part, s in zip(parts, items, strict=True)]

    # -- extra routes & status ------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        async def delete_model(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            return web.json_response({"model": name, "unloaded": await self.unload(name)})

        return [web.delete("/v1/unet/models/{name:.+}", delete_model)]

    def queue_depth(self) -> int:
        return self.batcher.depth

    def status(self) -> dict[str, Any]:
        b = self.batcher
        caches = {dtype_name(d): vars(c.stats()) for d, c in self._lora_caches.items()}
        runners = [m.graphs for m in self.resident if m.graphs is not None]
        return {
            "precision": self.precision,
            "batching": {
                "enabled": self.cfg.batching,
                "max_batch": b.max_rows,
                "max_delay_ms": b.max_delay * 1000,
                "batches": b.batches,
                "rows": b.rows_total,
                "largest_batch": b.largest_batch,
            },
            "lora_cache": caches,
            "graphs": self.graph_cfg.status(self.device, runners),
        }

    async def shutdown(self) -> None:
        await self.batcher.close()
        if self._redis is not None:
            await self._redis.aclose()
        await super().shutdown()


def build(settings: Settings) -> UnetService:
    return UnetService(settings)
