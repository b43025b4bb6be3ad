"""What every request passes first: the error model (every failure is a JSON error body, counted) and the
bearer token check."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from luna_stack.server.state import SERVICE, STATE
from luna_stack.wire.contract import OPEN_PATHS
from luna_stack.wire.errors import LunaError, Unauthorized

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
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
        return web.json_response(exc.to_json(), status=exc.status)
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
            counts = request.app[STATE].requests
            if outcome == "ok":
                counts.ok += 1
            else:
                counts.failed += 1


def auth(token: str | None) -> Middleware:
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
