"""aiohttp app factory shared by every service: health, status, metrics, jobs, errors, auth."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from luna_stack.gpu.nvml import nvml_status
from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.jobs.registry import Registry, ReplicaInfo
from luna_stack.jobs.worker import QueueWorker
from luna_stack.server import http_body
from luna_stack.server.ipc import HOST
from luna_stack.server.service import ModelService
from luna_stack.wire import codec
from luna_stack.wire.errors import BadRequest, LunaError, NotFound, Unauthorized, Unavailable
from luna_stack.wire.ipc import PARAM as IPC_PARAM

log = logging.getLogger(__name__)
SERVICE = web.AppKey("service", ModelService)
STATE = web.AppKey("state", dict)
OPEN_PATHS = ("/health/live", "/health/ready")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(exc: LunaError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.status)


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE]
    started = time.perf_counter()
    route = _route_label(request)
    code = "ok"
    try:
        response = await handler(request)
        status = response.status
        return response
    except LunaError as exc:
        code, status = exc.code, exc.status
        log.info("%s %s -> %d %s: %s", request.method, request.path, exc.status, exc.code, exc.message)
        return _error_response(exc)
    except web.HTTPException as exc:
        # aiohttp's own 404/405/...: same JSON shape as everything else.
        code, status = exc.reason.lower().replace(" ", "_"), exc.status
        body = {"error": {"code": code, "message": f"{request.method} {request.path}: {exc.reason}"}}
        return web.json_response(body, status=exc.status)
    except Exception as exc:
        code, status = "internal", 500
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(
            {
                "error": {
                    "code": "internal",
                    "message": f"{type(exc).__name__}: {exc}",
                    "hint": "the service stays up; see its log for the traceback",
                }
            },
            status=500,
        )
    finally:
        outcome = "ok" if status < 400 else "failed"
        service.metrics.requests.labels(route=route, outcome=outcome, code=code).inc()
        service.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)
        if route.startswith("/v1/") and not route.startswith("/v1/status"):
            request.app[STATE]["requests"][outcome] += 1


def _auth(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Unauthorized(
                    "missing or wrong bearer token" if given else "this service requires a bearer token",
                    hint="send 'Authorization: Bearer <LUNA_TOKEN>'",
                )
        return await handler(request)

    return check


def client_id(request: web.Request) -> str:
    return request.headers.get("X-Luna-Client") or (request.remote or "")


async def _run_op(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    op = request.match_info["op"]
    client = client_id(request)
    tensors, params = await http_body.read_tensors(request, _body_limit(request))
    spec = params.pop(IPC_PARAM, None)
    if spec is None:
        service.metrics.transport.labels(transport="http").inc()
        out, out_params = await service.run_op(op, tensors, params, client, HOST)
        return await http_body.write_tensors(request, out, out_params)
    service.metrics.transport.labels(transport="ipc").inc()
    async with service.ipc.request(spec, client) as (inputs, sink):
        if clash := sorted(set(inputs) & set(tensors)):
            raise BadRequest(f"tensors {clash} were sent both in the body and through IPC")
        out, out_params = await service.run_op(op, {**tensors, **inputs}, params, client, sink)
        if any(name not in sink.placed for name in out):
            await service.ipc.put_rest(sink, out)
    body = {name: t for name, t in out.items() if name not in sink.placed}
    return await http_body.write_tensors(request, body, {**out_params, IPC_PARAM: sink.reply()})


async def _ipc_register(request: web.Request) -> web.Response:
    _tensors, body = await http_body.read_tensors(request, _body_limit(request))
    buffer_id = await request.app[SERVICE].ipc.register({**body, "client": client_id(request)})
    return web.json_response({"buffer": buffer_id})


async def _ipc_release(request: web.Request) -> web.Response:
    released = await request.app[SERVICE].ipc.release(request.match_info["buffer"], client_id(request))
    return web.json_response({"buffer": request.match_info["buffer"], "released": released})


async def _models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response({"loaded": service.models(), "available": service.resident.available()})


async def _load_or_unload(request: web.Request) -> web.Response:
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


def _body_limit(request: web.Request) -> int:
    return int(request.app[SERVICE].settings.core.max_body_mb * (1 << 20))


def _queue(request: web.Request) -> JobQueue:
    queue = request.app[STATE].get("queue")
    if queue is None:
        raise Unavailable(
            "queued jobs need Redis, and this replica has no redis_url",
            hint="set LUNA_REDIS_URL, or call POST /v1/<kind>/<op> synchronously",
        )
    return queue


async def _submit_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    op = request.match_info["op"]
    if (queue := request.app[STATE].get("queue")) is not None:
        queue.check_size(request.content_length)  # max_job_mb, before the body is read
    blob = await http_body.read_body(request, _body_limit(request))
    _tensors, params = codec.decode(blob)  # reject a malformed body now, not later in a worker
    if IPC_PARAM in params:
        raise BadRequest(
            "queued jobs cannot use CUDA IPC buffers: a job may run after the client is gone",
            hint="send the tensors in the body, or call POST /v1/<kind>/<op> synchronously",
        )
    job_id = await _queue(request).submit(op, blob)
    return web.json_response({"job_id": job_id, "kind": service.kind, "op": op}, status=202)


async def _job_result(request: web.Request) -> web.StreamResponse:
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


async def _progress(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    entry = request.app[SERVICE].progress.get(request_id)
    if entry is None:
        raise NotFound(
            f"no progress recorded for request {request_id!r}",
            hint="progress exists only for long operations given a request_id, for 5 minutes",
        )
    return web.json_response({"request_id": request_id, **entry})


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    if not state["preloaded"]:
        problems.append(state.get("preload_error") or "loading preloaded models")
    redis = state.get("redis")
    if redis is not None:
        try:
            await asyncio.wait_for(redis.ping(), timeout=2)
        except Exception as exc:
            problems.append(f"redis unreachable: {exc}")
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


async def _status(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = request.app[STATE]
    queue_info: dict[str, Any] = {"batching": service.queue_depth()}
    if state.get("queue") is not None:
        with contextlib.suppress(Exception):
            queue_info.update(await state["queue"].depth())
    body = {
        **service.describe(),
        "ready": state["preloaded"],
        "uptime_s": round(time.time() - state["started"], 1),
        "address": state["address"],
        "models": service.models(),
        "queue": queue_info,
        "requests": dict(state["requests"]),
        "redis": state.get("redis") is not None,
        "gpu": nvml_status(),
        "ipc": service.ipc.describe(),
        **service.status(),
    }
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


async def _metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    for gpu in nvml_status()["gpus"]:
        service.metrics.gpu_memory.labels(gpu=str(gpu["index"]), uuid=gpu["uuid"]).set(
            gpu["memory_used_bytes"]
        )
    for model in service.models():
        service.metrics.model_bytes.labels(model=model["name"]).set(model.get("bytes", 0))
    body = generate_latest(service.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def advertised_address(host: str, port: int, replica_address: str | None) -> str:
    if replica_address:
        return replica_address
    if host in ("0.0.0.0", "::"):
        return f"{socket.gethostname()}:{port}"
    return f"{host}:{port}"


def create_app(service: ModelService, port: int) -> web.Application:
    """The service's aiohttp application; `port` is only used for the advertised address."""
    core = service.settings.core
    app = web.Application(
        middlewares=[_errors, _auth(core.token)],
        client_max_size=int(core.max_body_mb * (1 << 20)),
    )
    app[SERVICE] = service
    app[STATE] = {
        "preloaded": False,
        "started": time.time(),
        "requests": Counter({"ok": 0, "failed": 0}),
        "address": advertised_address(core.host, port, core.replica_address),
    }
    kind = service.kind
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/progress/{request_id}", _progress)
    app.router.add_post("/v1/ipc/buffers", _ipc_register)
    app.router.add_delete("/v1/ipc/buffers/{buffer}", _ipc_release)
    app.router.add_get(f"/v1/{kind}/models", _models)
    app.router.add_post(f"/v1/{kind}/{{action:load|unload}}", _load_or_unload)
    app.router.add_routes(service.routes())
    app.router.add_post(f"/v1/{kind}/jobs/{{op}}", _submit_job)
    app.router.add_get("/v1/jobs/{job_id}", _job_result)
    app.router.add_post(f"/v1/{kind}/{{op}}", _run_op)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _preload(app: web.Application) -> None:
    service = app[SERVICE]
    try:
        await service.startup()
        app[STATE]["preloaded"] = True
        log.info(
            "%s ready: %s", service.kind, ", ".join(m["name"] for m in service.models()) or "no models yet"
        )
    except Exception as exc:
        app[STATE]["preload_error"] = f"preload failed: {exc}"
        log.exception("%s: preload failed; the service stays unready", service.kind)


async def _heartbeat(app: web.Application, registry: Registry) -> None:
    service = app[SERVICE]
    core = service.settings.core
    while True:
        info = ReplicaInfo(
            id=service.replica_id,
            kind=service.kind,
            address=app[STATE]["address"],
            gpu_uuid=service.gpu_uuid,
            device=str(service.device),
            models=[m["name"] for m in service.models()],
            ipc=service.ipc.enabled,
            load={"queue": service.queue_depth(), **dict(app[STATE]["requests"])},
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


async def _on_startup(app: web.Application) -> None:
    service = app[SERVICE]
    core = service.settings.core
    tasks = [asyncio.create_task(_preload(app))]
    if service.ipc.enabled:
        # Checks on IPC inputs (finiteness) run on this thread: give it a stream of its own, so they
        # never wait for the forward the compute thread has queued on the default stream.
        torch.cuda.set_stream(torch.cuda.Stream(service.device))
        tasks.append(asyncio.create_task(_reap_ipc(app)))
    if core.redis_url:
        redis = connect(core.redis_url)
        app[STATE]["redis"] = redis
        queue = JobQueue(
            redis,
            service.kind,
            result_ttl_s=core.result_ttl_s,
            job_ttl_s=core.job_ttl_s,
            claim_idle_ms=core.claim_idle_ms,
            max_attempts=core.job_max_attempts,
            max_job_mb=core.max_job_mb,
        )
        app[STATE]["queue"] = queue
        worker = QueueWorker(
            queue,
            service.replica_id,
            lambda op, blob: _handle_job(app, op, blob),
            on_outcome=lambda outcome: service.metrics.jobs.labels(outcome=outcome).inc(),
        )
        app[STATE]["worker"] = worker
        app[STATE]["registry"] = Registry(redis, token=core.token)
        tasks.append(asyncio.create_task(_start_worker_when_ready(app, worker)))
        tasks.append(asyncio.create_task(_heartbeat(app, app[STATE]["registry"])))
    app[STATE]["tasks"] = tasks


async def _start_worker_when_ready(app: web.Application, worker: QueueWorker) -> None:
    # Take jobs only once the preload list is resident, so a slow start does not stall jobs.
    while not app[STATE]["preloaded"]:
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


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    service = app[SERVICE]
    for task in state.get("tasks", []):
        task.cancel()
    await asyncio.gather(*state.get("tasks", []), return_exceptions=True)
    if state.get("worker") is not None:
        await state["worker"].close()
    if state.get("registry") is not None:
        with contextlib.suppress(Exception):
            await state["registry"].withdraw(service.kind, service.replica_id)
    if state.get("redis") is not None:
        await state["redis"].aclose()
    await service.ipc.close_all()
    await service.shutdown()
