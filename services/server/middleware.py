"""What every request passes first: the error model (every failure is a JSON error body, counted per route
and per client, slow ones kept) and the token check (a bearer header, or the status page's cookie)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from luna_stack.server import page
from luna_stack.server.routes import client_id
from luna_stack.server.state import SERVICE, STATE
from luna_stack.wire.contract import OPEN_PATHS
from luna_stack.wire.errors import LunaError, Unauthorized

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


# Requests that count as a client's work: not the polling of status, metrics, progress or health.
_NOT_COUNTED = ("/v1/status", "/v1/progress", "/v1/stack")


def _counted(route: str) -> bool:
    return route.startswith("/v1/") and not route.startswith(_NOT_COUNTED)


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
        seconds = time.perf_counter() - started
        if status >= 400 and code == "ok":  # a handler's own error response (the page's login)
            code = f"http_{status}"
        outcome = "ok" if status < 400 else "failed"
        service.metrics.requests.labels(route=route, outcome=outcome, code=code).inc()
        service.metrics.request_seconds.labels(route=route).observe(seconds)
        state = request.app[STATE]
        counted = _counted(route)
        if counted:
            if outcome == "ok":
                state.requests.ok += 1
            else:
                state.requests.failed += 1
        if counted and not request.query.get("wait"):  # a job result long-poll is slow by design
            state.activity.record(request.method, request.path, client_id(request), status, code, seconds)


def auth(token: str | None) -> Middleware:
    """With a token: every request but /health/* and the page's login needs `Authorization: Bearer
    <token>`; GET requests may instead carry the cookie the status page's login sets (read-only, so a
    browser can show the page and its live data)."""
    expected = f"Bearer {token}".encode() if token else None
    cookie = page.cookie_value(token).encode() if token else b""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in OPEN_PATHS or request.path == page.LOGIN_PATH:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return await handler(request)
        if request.method in ("GET", "HEAD"):
            if hmac.compare_digest(request.cookies.get(page.COOKIE, "").encode(), cookie):
                return await handler(request)
            if request.path == page.PAGE_PATH:
                return page.login_page(status=401, kind=request.app[SERVICE].kind)
        raise Unauthorized(
            "missing or wrong bearer token" if given else "this service requires a bearer token",
            hint="send 'Authorization: Bearer <LUNA_TOKEN>'",
        )

    return check
