"""The aiohttp application of a service: middleware (errors, auth), routes, and the lifecycle tasks.

A request's path through the server: middleware.py (error model, token) -> routes.run_op (body or IPC
buffers in) -> service.Service.run_op (op spec, model) -> the family's serve (checks, limits) ->
batcher.Batcher (merges requests) -> executor.GpuExecutor (the compute thread) -> family.run_batch ->
ipc.Sink.put (outputs) -> routes.run_op (reply out)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from luna_stack.server import lifecycle, middleware, page, routes
from luna_stack.server.activity import Activity
from luna_stack.server.service import Service
from luna_stack.server.state import SERVICE, STATE, AppState

# How every service's server runs (luna-stack serve, embedded test servers, benchmarks): a client that
# disconnects cancels its request's handler, so the batcher drops the request before it runs.
SERVER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "access_log": None}


def create_app(service: Service, port: int) -> web.Application:
    """The service's aiohttp application; `port` is only used for the advertised address."""
    core = service.settings.core
    app = web.Application(
        middlewares=[
            middleware.errors,
            middleware.auth(core.token),
            middleware.per_client_limit(core.max_client_requests),
        ],
        client_max_size=int(core.max_body_mb * (1 << 20)),
    )
    app[SERVICE] = service
    app[STATE] = AppState(
        address=lifecycle.advertised_address(core.host, port, core.replica_address),
        activity=Activity(core.slow_request_ms),
    )
    routes.add_routes(app, service.kind)
    page.add_routes(app)
    app.on_startup.append(lifecycle.on_startup)
    app.on_cleanup.append(lifecycle.on_cleanup)
    return app
