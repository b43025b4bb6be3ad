"""What every request passes first: the error model (every failure is a JSON error body, counted per route
and per client, slow ones kept) and the token check (a bearer header, or the status page's cookie)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from luna_stack.server import page
from luna_stack.server.state import SERVICE, STATE
from luna_stack.wire.contract import CLIENT_HEADER, OPEN_PATHS
from luna_stack.wire.errors import ClientGone, LunaError, TooManyRequests, Unauthorized

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
    except asyncio.CancelledError:
        code, status = "client_gone", ClientGone.status  # the client disconnected: nothing to answer
        raise
    except ConnectionResetError:  # the client went away while its body or reply was in flight
        code, status = "client_gone", ClientGone.status
        return web.json_response(ClientGone("the client disconnected").to_json(), status=status)
    except web.HTTPException as exc:
        # aiohttp's own 404/405/...: same JSON shape as everything else.
        code, status = exc.reason.lower().replace(" ", "_"), exc.status
        body = {"error": {"code": code, "message": f"{request.method} {request.path}: {exc.reason}"}}
        return web.json_response(body, status=exc.status)
    except Exception as exc:
        # A bug, not the client's fault: the reply names only the incident (its text may hold host paths).
        code, status = "internal", 500
        incident = uuid.uuid4().hex[:12]
        log.exception("%s %s failed (incident %s)", request.method, request.path, incident)
        message = f"internal error {type(exc).__name__} (incident {incident})"
        hint = "the service stays up; its log has the traceback under this incident id"
        return web.json_response(
            {"error": {"code": "internal", "message": message, "hint": hint}}, status=500
        )
    finally:
        seconds = time.perf_counter() - started
        if status >= 400 and code == "ok":  # a handler's own error response (the page's login)
            code = f"http_{status}"
        outcome = "ok" if status < 400 else "client_gone" if status == ClientGone.status else "failed"
        service.metrics.requests.labels(route=route, outcome=outcome, code=code).inc()
        service.metrics.request_seconds.labels(route=route).observe(seconds)
        state = request.app[STATE]
        counted = _counted(route)
        if counted:
            state.requests.count(outcome)
        if counted and not request.query.get("wait"):  # a job result long-poll is slow by design
            state.activity.record(request.method, request.path, client_id(request), status, code, seconds)


def client_id(request: web.Request) -> str:
    """Who sends a request: its X-Luna-Client name (fairness, IPC buffer ownership), else its address."""
    return request.headers.get(CLIENT_HEADER) or (request.remote or "")


def per_client_limit(max_in_flight: int) -> Middleware:
    """At most `max_in_flight` requests of one client at a time, so one client cannot hold every
    connection and queue slot; health, status and metrics are never counted or refused."""
    in_flight: Counter[str] = Counter()

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/") or request.path == "/v1/status":
            return await handler(request)
        client = client_id(request)
        if in_flight[client] >= max_in_flight:
            raise TooManyRequests(
                f"client {client[:64]!r} has {in_flight[client]} requests in flight already",
                hint="wait for replies first, or raise max_client_requests (LUNA_MAX_CLIENT_REQUESTS)",
            )
        in_flight[client] += 1
        try:
            return await handler(request)
        finally:
            in_flight[client] -= 1
            if not in_flight[client]:
                del in_flight[client]

    return limit


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
