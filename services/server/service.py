"""The base every model service implements; the app (app.py) and the queue worker only talk to this."""

from __future__ import annotations

import abc
import gc
import os
import socket
import uuid
from typing import Any, ClassVar

import torch
from aiohttp import web

from luna_stack.config import Settings
from luna_stack.gpu.device import gpu_uuid, select_device, select_dtype
from luna_stack.server.executor import GpuExecutor
from luna_stack.server.ipc import IpcBuffers, Sink
from luna_stack.server.metrics import Metrics
from luna_stack.server.progress import ProgressTable
from luna_stack.server.resident import ResidentModels
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.tensors import dtype_name

Tensors = dict[str, torch.Tensor]
Params = dict[str, Any]


class ModelService(abc.ABC):
    kind: ClassVar[str]
    default_port: ClassVar[int]
    resident: ResidentModels[Any]  # set by each service: its models by canonical name

    def __init__(self, settings: Settings):
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

    @abc.abstractmethod
    async def run_op(
        self, op: str, tensors: Tensors, params: Params, client: str, sink: Sink
    ) -> tuple[Tensors, Params]:
        """Run one operation (`POST /v1/<kind>/<op>` and queued jobs both land here). Outputs go through
        `sink.put` on the compute thread (to the host, or into the client's IPC buffer); an output
        returned without it is placed by the app afterwards."""

    @abc.abstractmethod
    def models(self) -> list[dict[str, Any]]:
        """Resident models: name, bytes, dtype, device and anything service-specific."""

    @abc.abstractmethod
    async def startup(self) -> None:
        """Load the preload list (runs in the background; /health/ready waits for it)."""

    async def shutdown(self) -> None:
        self.executor.shutdown()

    async def load(self, name: str) -> dict[str, Any]:
        """POST /v1/<kind>/load {"model": name}: make a model resident now (not on first use)."""
        return (await self.resident.get(name, preload=True)).describe()

    async def unload(self, name: str) -> bool:
        """POST /v1/<kind>/unload {"model": name}. Requests already holding the model still finish."""
        if not await self.resident.unload(name):
            return False
        await self.executor.run(_release_memory, self.device)
        return True

    def routes(self) -> list[web.RouteDef]:
        """Service-specific routes besides POST /v1/<kind>/<op>."""
        return []

    def status(self) -> dict[str, Any]:
        """Service-specific status (batching, caches); merged into GET /v1/status."""
        return {}

    def queue_depth(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {
            "service": self.kind,
            "replica": self.replica_id,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "gpu_uuid": self.gpu_uuid,
        }


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
