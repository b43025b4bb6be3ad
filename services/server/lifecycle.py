"""What runs beside the routes from start to stop: loading the preload list, the one Redis connection
of the process (queue worker, registry heartbeat, the family's caches), and IPC buffer reaping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import torch
from aiohttp import web

from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.jobs.registry import Registry, ReplicaInfo
from luna_stack.jobs.worker import QueueWorker
from luna_stack.server.ipc import HOST
from luna_stack.server.state import SERVICE, STATE
from luna_stack.wire import codec
from luna_stack.wire.errors import BadRequest
from luna_stack.wire.ipc import PARAM as IPC_PARAM

log = logging.getLogger(__name__)


def advertised_address(host: str, port: int, replica_address: str | None) -> str:
    if replica_address:
        return replica_address
    if host in ("0.0.0.0", "::"):
        return f"{socket.gethostname()}:{port}"
    return f"{host}:{port}"


async def on_startup(app: web.Application) -> None:
    service = app[SERVICE]
    state = app[STATE]
    core = service.settings.core
    if core.redis_url:
        state.redis = connect(core.redis_url)
        service.attach_redis(state.redis)
    state.tasks.append(asyncio.create_task(_preload(app)))
    if service.ipc.enabled:
        # Checks on IPC inputs (finiteness) run on this thread: give it a stream of its own, so they
        # never wait for the forward the compute thread has queued on the default stream.
        torch.cuda.set_stream(torch.cuda.Stream(service.device))
        state.tasks.append(asyncio.create_task(_reap_ipc(app)))
    if state.redis is not None:
        state.queue = JobQueue(
            state.redis,
            service.kind,
            result_ttl_s=core.result_ttl_s,
            job_ttl_s=core.job_ttl_s,
            claim_idle_ms=core.claim_idle_ms,
            max_attempts=core.job_max_attempts,
            max_job_mb=core.max_job_mb,
        )
        state.worker = QueueWorker(
            state.queue,
            service.replica_id,
            lambda op, blob: _handle_job(app, op, blob),
            on_outcome=lambda outcome: service.metrics.jobs.labels(outcome=outcome).inc(),
        )
        state.registry = Registry(state.redis, token=core.token)
        state.tasks.append(asyncio.create_task(_start_worker_when_ready(app, state.worker)))
        state.tasks.append(asyncio.create_task(_heartbeat(app, state.registry)))


async def on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    service = app[SERVICE]
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    if state.worker is not None:
        await state.worker.close()
    if state.registry is not None:
        with contextlib.suppress(Exception):
            await state.registry.withdraw(service.kind, service.replica_id)
    await service.ipc.close_all()
    await service.shutdown()
    if state.redis is not None:
        await state.redis.aclose()


async def _preload(app: web.Application) -> None:
    service = app[SERVICE]
    state = app[STATE]
    try:
        await service.preload()
        state.preloaded = True
        log.info(
            "%s ready: %s", service.kind, ", ".join(m["name"] for m in service.models()) or "no models yet"
        )
    except Exception as exc:
        state.preload_error = f"preload failed: {exc}"
        log.exception("%s: preload failed; the service stays unready", service.kind)


async def _heartbeat(app: web.Application, registry: Registry) -> None:
    service = app[SERVICE]
    state = app[STATE]
    core = service.settings.core
    while True:
        info = ReplicaInfo(
            id=service.replica_id,
            kind=service.kind,
            address=state.address,
            gpu_uuid=service.gpu_uuid,
            device=str(service.device),
            models=[m["name"] for m in service.models()],
            ipc=service.ipc.enabled,
            load={"queue": service.queue_depth(), "ok": state.requests.ok, "failed": state.requests.failed},
        )
        try:
            await registry.announce(info, ttl_s=core.heartbeat_s * 3)
        except Exception as exc:
            log.warning("registry heartbeat failed: %s", exc)
        await asyncio.sleep(core.heartbeat_s)


async def _handle_job(app: web.Application, op: str, blob: bytes) -> bytes:
    service = app[SERVICE]
    tensors, params = codec.decode(blob)
    if IPC_PARAM in params:
        raise BadRequest("queued jobs cannot use CUDA IPC buffers")
    out, out_params = await service.run_op(op, tensors, params, "queue", HOST)
    return codec.encode(out, out_params)


async def _start_worker_when_ready(app: web.Application, worker: QueueWorker) -> None:
    # Take jobs only once the preload list is resident, so a slow start does not stall jobs.
    while not app[STATE].preloaded:
        await asyncio.sleep(0.05)
    await worker.run()


async def _reap_ipc(app: web.Application) -> None:
    buffers = app[SERVICE].ipc
    while True:
        await asyncio.sleep(min(10.0, buffers.idle_s / 2))
        try:
            await buffers.reap()
        except Exception:
            log.exception("IPC: reaping buffers failed")
