"""The HTTP routes of every service: where a request enters (`run_op`) and where its reply leaves
(a streamed safetensors body, or CUDA IPC buffers plus a small body)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from luna_stack.gpu.device import stream_drained
from luna_stack.gpu.nvml import nvml_status
from luna_stack.jobs.queue import JobQueue
from luna_stack.server import http_body
from luna_stack.server.family import Tensors
from luna_stack.server.held import HeldSpec, HeldTensors
from luna_stack.server.ipc import HOST, Sink
from luna_stack.server.middleware import client_id
from luna_stack.server.state import SERVICE, STATE
from luna_stack.wire import codec
from luna_stack.wire.contract import HELD_KEPT, HELD_PARAM
from luna_stack.wire.errors import BadRequest, LunaError, NoQueue, NotFound
from luna_stack.wire.ipc import PARAM as IPC_PARAM


def _body_limit(request: web.Request) -> http_body.BodyLimits:
    return http_body.BodyLimits.of(request.app[SERVICE].settings.core)


# -- operations ---------------------------------------------------------------------------------------
HELD = web.AppKey("held", HeldTensors)


async def run_op(request: web.Request) -> web.StreamResponse:
    """POST /v1/<kind>/<op>: tensors in the body, or in the client's IPC buffers when params say so, and
    tensors the service holds for the client where params `_held` refers to them (held.py)."""
    entered = time.monotonic()
    service = request.app[SERVICE]
    held = request.app[HELD]
    op = request.match_info["op"]
    client = client_id(request)
    tensors, params = await http_body.read_tensors(request, _body_limit(request))
    computed = entered  # when the service handed the results back: the reply stage starts
    spec = params.pop(IPC_PARAM, None)
    raw_held = params.pop(HELD_PARAM, None)
    holding = None if raw_held is None else HeldSpec.parse(raw_held)

    def abandoned() -> bool:
        return request.transport is None or request.transport.is_closing()

    async def run(sent: Tensors, sink: Sink) -> tuple[Tensors, dict[str, Any]]:
        nonlocal computed
        inputs = sent if holding is None else held.resolve(client, holding, sent)
        service.metrics.stage("inputs", time.monotonic() - entered)
        out, out_params = await service.run_op(op, inputs, params, client, sink, abandoned)
        computed = time.monotonic()
        if holding is None:
            return out, out_params
        kept = held.keep(client, holding, inputs)
        if kept:
            await stream_drained(service.device)  # the copies, before the client may reuse its buffers
        return out, {**out_params, HELD_PARAM: {HELD_KEPT: kept}}

    def replied(response: web.StreamResponse) -> web.StreamResponse:
        service.metrics.stage("reply", time.monotonic() - computed)
        return response

    if spec is None:
        service.metrics.transport.labels(transport="http").inc()
        out, out_params = await run(tensors, HOST)
        return replied(await http_body.write_tensors(request, out, out_params))
    service.metrics.transport.labels(transport="ipc").inc()

    async def through_ipc() -> tuple[Tensors, dict[str, Any], dict[str, Any]]:
        async with service.ipc.request(spec, client) as (inputs, sink):
            if clash := sorted(set(inputs) & set(tensors)):
                raise BadRequest(f"tensors {clash} were sent both in the body and through IPC")
            out, out_params = await run({**tensors, **inputs}, sink)
            if any(name not in sink.placed for name in out):
                await service.ipc.put_rest(sink, out)
        body = {name: t for name, t in out.items() if name not in sink.placed}
        return body, out_params, sink.reply()

    # Shielded from the handler's cancellation when the client leaves: the buffers stay leased (so never
    # unmapped by the reaper) until a batch already writing into them has finished.
    body, out_params, placed = await asyncio.shield(asyncio.ensure_future(through_ipc()))
    return replied(await http_body.write_tensors(request, body, {**out_params, IPC_PARAM: placed}))


async def ops(request: web.Request) -> web.Response:
    """GET /v1/<kind>/ops: each operation's inputs and outputs."""
    family = request.app[SERVICE].family
    return web.json_response({"ops": [spec.describe() for spec in family.ops.values()]})


async def ipc_register(request: web.Request) -> web.Response:
    _tensors, body = await http_body.read_tensors(request, _body_limit(request))
    return web.json_response(await request.app[SERVICE].ipc.register({**body, "client": client_id(request)}))


async def ipc_release(request: web.Request) -> web.Response:
    released = await request.app[SERVICE].ipc.release(request.match_info["buffer"], client_id(request))
    return web.json_response({"buffer": request.match_info["buffer"], "released": released})


# -- models -------------------------------------------------------------------------------------------
async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body: dict[str, Any] = {"loaded": service.models(), "available": service.resident.available()}
    if service.family.takes_lora:
        body["loras"] = service.roots.list(["loras"])
    return web.json_response(body)


async def load_or_unload(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    _tensors, params = await http_body.read_tensors(request, _body_limit(request))
    name = params.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest('send {"model": "<name>"}', hint=f"loaded: {[m['name'] for m in service.models()]}")
    if request.match_info["action"] == "load":
        result = await service.load(name)
    else:
        result = {"model": name, "unloaded": await service.unload(name)}
    if request.content_type == "application/json":
        return web.json_response(result)
    return await http_body.write_tensors(request, {}, result)  # the client's call(): blob in, blob out


async def delete_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    return web.json_response({"model": name, "unloaded": await request.app[SERVICE].unload(name)})


# -- queued jobs --------------------------------------------------------------------------------------
def _queue(request: web.Request) -> JobQueue:
    queue = request.app[STATE].queue
    if queue is None:
        raise NoQueue(
            "queued jobs need Redis, and this replica has no redis_url",
            hint="set LUNA_REDIS_URL, or call POST /v1/<kind>/<op> synchronously",
        )
    return queue


async def submit_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    op = request.match_info["op"]
    if (queue := request.app[STATE].queue) is not None:
        queue.check_size(request.content_length)  # max_job_mb, before the body is read
    blob = await http_body.read_body(request, _body_limit(request))
    _tensors, params = codec.decode(blob)  # reject a malformed body now, not later in a worker
    if IPC_PARAM in params:
        raise BadRequest(
            "queued jobs cannot use CUDA IPC buffers: a job may run after the client is gone",
            hint="send the tensors in the body, or call POST /v1/<kind>/<op> synchronously",
        )
    if HELD_PARAM in params:
        raise BadRequest(
            "queued jobs cannot refer to held tensors: a job may run on another replica, or later",
            hint=f"send the tensors themselves, without params.{HELD_PARAM}",
        )
    job_id = await _queue(request).submit(op, blob)
    return web.json_response({"job_id": job_id, "kind": service.kind, "op": op}, status=202)


async def job_result(request: web.Request) -> web.StreamResponse:
    queue = _queue(request)
    job_id = request.match_info["job_id"]
    try:
        wait_s = float(request.query.get("wait", "0"))
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    info = await queue.state(job_id)
    if info["state"] not in ("done", "failed") and wait_s > 0:
        with contextlib.suppress(LunaError):
            await queue.result(job_id, timeout_s=min(wait_s, 300.0))
        info = await queue.state(job_id)
    if info["state"] in ("queued", "running"):
        return web.json_response({"job_id": job_id, "state": info["state"]}, status=202)
    blob = await queue.result(job_id, timeout_s=0.1)  # raises the job's own error if it failed
    tensors, params = codec.decode(blob)
    return await http_body.write_tensors(request, tensors, params)


async def progress(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    entry = request.app[SERVICE].progress.get(request_id)
    if entry is None:
        raise NotFound(
            f"no progress recorded for request {request_id!r}",
            hint="progress exists only for long operations given a request_id, for 5 minutes",
        )
    return web.json_response({"request_id": request_id, "done": entry.done, "total": entry.total})


# -- health, status, metrics --------------------------------------------------------------------------
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    if not state.preloaded:
        problems.append(state.preload_error or "loading preloaded models")
    if state.redis is not None:
        try:
            await asyncio.wait_for(state.redis.ping(), timeout=2)
        except Exception as exc:
            problems.append(f"redis unreachable: {exc}")
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


async def status(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = request.app[STATE]
    queue_info: dict[str, Any] = {"batching": service.queue_depth()}
    if state.queue is not None:
        with contextlib.suppress(Exception):
            queue_info.update(await state.queue.depth())
    body = {
        **service.describe(),
        "ready": state.preloaded,
        "uptime_s": round(time.time() - state.started, 1),
        "address": state.address,
        "models": service.models(),
        "queue": queue_info,
        "requests": dataclasses.asdict(state.requests),
        "clients": state.activity.clients(),
        "slow_requests": state.activity.slow(),
        "slow_request_ms": state.activity.slow_ms,
        "process": _process(),
        "redis": state.redis is not None,
        "gpu": nvml_status(),
        "ipc": service.ipc.describe(),
        "held": request.app[HELD].describe(),
        "latency_ms": service.metrics.stages.describe(),
        **service.status(),
    }
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


def _process() -> dict[str, Any]:
    """This process: pid and resident memory (what a CPU-only host has instead of GPU memory)."""
    rss = None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"pid": os.getpid(), "rss_bytes": rss}


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    for gpu in nvml_status()["gpus"]:
        service.metrics.gpu_memory.labels(gpu=str(gpu["index"]), uuid=gpu["uuid"]).set(
            gpu["memory_used_bytes"]
        )
    for model in service.models():
        service.metrics.model_bytes.labels(model=model["name"]).set(model.get("bytes", 0))
    body = generate_latest(service.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _sweep_held(app: web.Application) -> Any:
    """Held tensors of clients gone quiet are dropped on time, not only when a request or a status call
    looks at the store (the last client's conditioning would otherwise stay on the device)."""
    held = app[HELD]

    async def sweep() -> None:
        while True:
            await asyncio.sleep(min(60.0, held.idle_s / 4))
            held.sweep()

    task = asyncio.create_task(sweep())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_routes(app: web.Application, kind: str) -> None:
    app[HELD] = HeldTensors.of(app[SERVICE].device, app[SERVICE].settings.core)
    app.cleanup_ctx.append(_sweep_held)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/progress/{request_id}", progress)
    app.router.add_post("/v1/ipc/buffers", ipc_register)
    app.router.add_delete("/v1/ipc/buffers/{buffer}", ipc_release)
    app.router.add_get(f"/v1/{kind}/ops", ops)
    app.router.add_get(f"/v1/{kind}/models", models)
    app.router.add_delete(f"/v1/{kind}/models/{{name:.+}}", delete_model)
    app.router.add_post(f"/v1/{kind}/{{action:load|unload}}", load_or_unload)
    app.router.add_post(f"/v1/{kind}/jobs/{{op}}", submit_job)
    app.router.add_get("/v1/jobs/{job_id}", job_result)
    app.router.add_post(f"/v1/{kind}/{{op}}", run_op)
