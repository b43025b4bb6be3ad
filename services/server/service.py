"""One service replica: a model family with what the server runs it with — resident models, the batcher,
the compute thread, IPC buffers, progress and metrics. The routes (routes.py) and the queue worker
(lifecycle.py) talk only to this."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from luna_stack.config import Settings
from luna_stack.gpu.device import StreamMarks, gpu_uuid, select_device, select_dtype
from luna_stack.server.batcher import Batcher
from luna_stack.server.executor import GpuExecutor
from luna_stack.server.family import (
    IdlePolicy,
    ModelFamily,
    OpRequest,
    Params,
    ServiceContext,
    Tensors,
    Work,
)
from luna_stack.server.finite import check_finite
from luna_stack.server.ipc import IpcBuffers, Sink
from luna_stack.server.metrics import Metrics
from luna_stack.server.progress import ProgressTable
from luna_stack.server.resident import ModelBudget, ResidentModels
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.contract import DEFAULT_PORTS
from luna_stack.wire.errors import NotFound
from luna_stack.wire.tensors import dtype_name

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings, family: type[ModelFamily[Any, Any]]):
        self.kind = family.kind
        self.default_port = DEFAULT_PORTS[self.kind]
        self.settings = settings
        self.device = select_device(settings.core.device)
        self.dtype = select_dtype(settings.core.dtype, self.device)
        self.roots = ModelRoots(settings.core.model_roots)
        self.executor = GpuExecutor(self.kind)
        self.metrics = Metrics(self.kind)
        self.replica_id = f"{self.kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.gpu_uuid = gpu_uuid(self.device)
        self.progress = ProgressTable()
        self.ipc = IpcBuffers(self.device, self.gpu_uuid, self.executor, settings.core.ipc_idle_s)
        self.ctx = ServiceContext(
            self.kind,
            settings,
            self.device,
            self.dtype,
            self.roots,
            self.executor,
            self.metrics,
            self.progress,
            self.replica_id,
        )
        self.family = family(self.ctx)
        self.resident: ResidentModels[Any] = ResidentModels(
            self.kind,
            self.roots,
            family.folders,
            self.executor,
            self.family.load,
            load_on_demand=self.family.load_on_demand,
            budget=ModelBudget(settings.core.max_models, int(settings.core.max_model_gb * 2**30)),
            size_of=lambda model: int(self.family.describe_model(model).get("bytes", 0)),
        )
        policy = self.family.batching
        self.batcher: Batcher[Work, Any] = Batcher(
            self.kind,
            self._run_batch,
            self.executor,
            max_rows=policy.max_rows,
            max_delay_ms=policy.max_delay_ms,
            metrics=self.metrics,
            buckets=policy.buckets,
            marks=StreamMarks(self.device) if self.device.type == "cuda" else None,
        )
        self._done = 0  # requests finished and models loaded: what "idle" watches
        self._touched = asyncio.Event()
        self._idle_task: asyncio.Task[None] | None = None

    # -- requests ---------------------------------------------------------------------------------------
    async def run_op(
        self,
        op: str,
        tensors: Tensors,
        params: Params,
        client: str,
        sink: Sink,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> tuple[Tensors, Params]:
        """POST /v1/<kind>/<op> and queued jobs both land here. Outputs go through `sink.put` on the
        compute thread (to the host, or into the client's IPC buffer); an output returned without it is
        placed by the route afterwards."""
        spec = self.family.ops.get(op)
        if spec is None:
            raise NotFound(
                f"unknown {self.kind} operation {op!r}", hint=f"one of {', '.join(self.family.ops)}"
            )
        entered = time.monotonic()
        spec.check_names(tensors)
        await check_finite(tensors)
        model = await self.resident.get(params.get("model"))

        async def compute(work: Work) -> Any:
            self.metrics.stage("prepare", time.monotonic() - entered)
            key = self.family.batch_key(work)
            return await self.batcher.enqueue(key, work, rows=work.rows, client=client, early=sink.early)

        try:
            reply = await self.family.serve(
                OpRequest(op, model, tensors, params, client, sink, compute, abandoned)
            )
        finally:
            self._touch()
        return reply.tensors, reply.params

    def _run_batch(self, _key: Hashable, works: list[Work]) -> list[Any]:
        return self.family.run_batch(works)

    # -- models -----------------------------------------------------------------------------------------
    async def preload(self) -> None:
        """Start the family and its idle work, then load the preload list (/health/ready waits for this:
        graph captures other than graph_capture=start ones come after it)."""
        await self.family.startup()
        policy = self.family.idle_policy
        if policy is not None and self._idle_task is None:
            self._idle_task = asyncio.create_task(self._idle_work(policy))
        for name in self.family.preload:
            await self.resident.get(name, preload=True)
            self._touch()

    async def load(self, name: str) -> dict[str, Any]:
        """POST /v1/<kind>/load {"model": name}: make a model resident now (not on first use)."""
        model = await self.resident.get(name, preload=True)
        self._touch()
        return self.family.describe_model(model)

    # -- idle work --------------------------------------------------------------------------------------
    def _touch(self) -> None:
        self._done += 1
        self._touched.set()

    async def _until_quiet(self, seconds: float) -> None:
        """Until, for `seconds`, no request or load has finished, none waits in the batcher and the
        compute thread is free."""
        while True:
            done = self._done
            await asyncio.sleep(seconds)
            if done == self._done and self.batcher.idle and not self.executor.busy:
                return

    async def _idle_work(self, policy: IdlePolicy) -> None:
        """After requests or loads: the family's background work (graph captures), one unit at a time and
        each only once the service is quiet, so a request arriving meanwhile waits for at most one unit;
        then, after `release_s` without requests, the caching allocator's cached blocks (activations of
        eager batches) go back to the device, once per idle period."""
        while True:
            await self._touched.wait()
            self._touched.clear()
            try:
                more = True
                while more:
                    await self._until_quiet(policy.work_ms / 1000)
                    more = await self.executor.run(self.family.background_work, list(self.resident))
                if not policy.release_s or self.device.type != "cuda":
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._touched.wait(), policy.release_s)
                    continue  # more traffic: start over (the event is still set)
                if self.batcher.idle and not self.executor.busy:
                    await self.executor.run(_release_memory, self.device, collect=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # a capture's own failures are the runner's; this keeps the loop alive
                log.exception("%s: idle work failed", self.kind)

    async def unload(self, name: str) -> bool:
        """POST /v1/<kind>/unload {"model": name}. Requests already holding the model still finish."""
        if not await self.resident.unload(name):
            return False
        await self.executor.run(_release_memory, self.device)
        return True

    def models(self) -> list[dict[str, Any]]:
        return [self.family.describe_model(m) for m in self.resident]

    # -- status -----------------------------------------------------------------------------------------
    def attach_redis(self, redis: aioredis.Redis) -> None:
        self.ctx.redis = redis

    def queue_depth(self) -> int:
        return self.batcher.depth

    def describe(self) -> dict[str, Any]:
        return {
            "service": self.kind,
            "replica": self.replica_id,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "gpu_uuid": self.gpu_uuid,
        }

    def status(self) -> dict[str, Any]:
        """Batching and the family's own status, merged into GET /v1/status."""
        b = self.batcher
        batching = {
            "max_batch": b.max_rows,
            "max_delay_ms": b.max_delay * 1000,
            "batches": b.batches,
            "rows": b.rows_total,
            "largest_batch": b.largest_batch,
            "recent_mean_rows": b.mean_recent_rows,
            "turnaround_ms": None if b.last_turnaround is None else b.last_turnaround * 1000,
            "fill_waits": b.waits,
            "fill_wait_ms": b.wait_seconds * 1000,
            "fill_timeouts": b.wait_timeouts,
            "in_flight": b.in_flight,
            "queued_behind": b.queued_behind,
        }
        return {"batching": batching, **self.family.status(list(self.resident))}

    async def shutdown(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        await self.batcher.close()
        await self.family.shutdown()
        self.executor.shutdown()


def _release_memory(device: torch.device, collect: bool = True) -> None:
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
