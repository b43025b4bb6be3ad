"""The status page at `/`: one self-contained HTML file (status_page.html: no external assets) that
refreshes itself from GET /v1/status and GET /metrics, plus GET /v1/stack (the other replicas, from the
registry) for its links.

With a token configured the page is behind it too: a browser cannot send a bearer header when it opens a
URL, so `/` answers a login form, POST /login checks the token and sets an HttpOnly, SameSite=Strict
cookie (an HMAC of the token, not the token), and the auth middleware accepts that cookie on GET requests
only — it can read, never run or change anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import urllib.parse
from importlib import resources

from aiohttp import web

from luna_stack.server import http_body
from luna_stack.server.state import SERVICE, STATE
from luna_stack.wire.contract import KINDS
from luna_stack.wire.errors import InvalidBody

PAGE_PATH = "/"
LOGIN_PATH = "/login"
COOKIE = "luna_status"
_LOGIN_BYTES = 4096  # the login form: one token field


def cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"luna-stack status page", hashlib.sha256).hexdigest()


def _page_html() -> str:
    return resources.files("luna_stack.server").joinpath("status_page.html").read_text(encoding="utf-8")


_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Luna Stack: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; background: #f4f5f7; color: #1d2330; display: grid;
       place-items: center; min-height: 100vh; margin: 0; }}
form {{ background: #fff; padding: 28px 32px; border-radius: 10px; box-shadow: 0 2px 12px #0002;
        width: 340px; }}
h1 {{ font-size: 18px; margin: 0 0 6px; }} p {{ color: #5b6475; margin: 0 0 16px; }}
input {{ width: 100%; box-sizing: border-box; padding: 8px 10px; font: inherit; border: 1px solid #c5cad3;
        border-radius: 6px; }}
button {{ margin-top: 14px; padding: 8px 16px; font: inherit; border: 0; border-radius: 6px;
         background: #3558d4; color: #fff; cursor: pointer; }}
.error {{ color: #b3261e; }}
</style></head><body>
<form method="post" action="/login" id="login">
  <h1>Luna Stack {kind} service</h1>
  <p>This service requires its token (LUNA_TOKEN) to show its status.</p>
  {error}
  <input type="password" name="token" id="token" placeholder="token" autofocus
         autocomplete="current-password">
  <button type="submit">Show status</button>
</form></body></html>
"""


def login_page(status: int = 200, error: str = "", kind: str = "") -> web.Response:
    shown = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
    body = _LOGIN.format(kind=html.escape(kind), error=shown)
    return web.Response(text=body, status=status, content_type="text/html")


async def page(request: web.Request) -> web.Response:
    response = web.Response(text=_page_html(), content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'"
    )
    return response


async def login(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    token = service.settings.core.token
    to_page = web.Response(status=303, headers={"Location": PAGE_PATH})
    if not token:
        return to_page
    # Unauthenticated: read through the body limits (a form of a few bytes), never aiohttp's post().
    body = await http_body.read_body(
        request, http_body.BodyLimits(_LOGIN_BYTES, service.settings.core.read_timeout_s)
    )
    try:
        form = urllib.parse.parse_qs(body.decode(), max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        raise InvalidBody("the login form is not a URL-encoded form") from None
    given = (form.get("token") or [""])[0]
    if not hmac.compare_digest(given.encode(), token.encode()):
        return login_page(status=401, error="That is not this service's token.", kind=service.kind)
    to_page.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="Strict", path="/")
    return to_page


async def stack(request: web.Request) -> web.Response:
    """GET /v1/stack: every replica in the registry (each kind), for the page's links."""
    registry = request.app[STATE].registry
    if registry is None:
        return web.json_response({"replicas": [], "reason": "no redis_url: this replica has no registry"})
    replicas = []
    for kind in KINDS:
        with contextlib.suppress(Exception):
            replicas += [
                {"kind": r.kind, "id": r.id, "url": r.url, "models": r.models, "device": r.device}
                for r in await registry.replicas(kind)
            ]
    return web.json_response({"replicas": replicas})


def add_routes(app: web.Application) -> None:
    app.router.add_get(PAGE_PATH, page)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_get("/v1/stack", stack)
