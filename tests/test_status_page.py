"""The status page at `/` in a real headless browser (Chromium, driven over the DevTools protocol): behind
the token, rendering live values from /v1/status and /metrics, and a screenshot that is checked.

Needs `chromium-headless-shell` (or `chromium`) from Debian's packages; .ci/run installs it and sets
LUNA_REQUIRE_BROWSER=1 so CI never skips this. LUNA_STATUS_SCREENSHOT=path also saves the screenshot
(`make screenshot` writes docs/status-page.png with it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from PIL import Image

from luna_stack.client.http import Client
from luna_stack.devtools.embedded import EmbeddedService, free_port
from luna_stack.server import page as page_module
from luna_stack.server.activity import MAX_CLIENTS, SLOW_KEPT, Activity
from luna_stack.vae.family import build as build_vae
from luna_stack.wire.errors import UnknownModel

from .conftest import make_settings

TOKEN = "page-test-token"
VAE = "vae/sd15-small-vae.safetensors"
WIDTH, HEIGHT = 1280, 1000


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.environ.get("LUNA_REQUIRE_BROWSER") == "1":
        pytest.fail("no headless Chromium: apt-get install chromium-headless-shell (CI needs it)")
    pytest.skip("no headless Chromium (apt-get install chromium-headless-shell)")


class Page:
    """One browser tab over the Chrome DevTools Protocol (a websocket)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=30)).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(RuntimeError):  # e.g. while a navigation replaces the document
                value = await self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"never true: {expression}\npage text:\n{text}")
            await asyncio.sleep(0.1)

    async def text(self, selector: str) -> str:
        return await self.evaluate(f"document.querySelector({json.dumps(selector)}).innerText")


@contextlib.asynccontextmanager
async def browser(tmp: Path) -> AsyncIterator[Page]:
    port = free_port()
    proc = subprocess.Popen(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={tmp}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Debian's chromium-headless-shell is a script that starts the browser
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.load(resp) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            await asyncio.sleep(0.1)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws,
        ):
            page = Page(ws)
            await page.send(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM to the browser's whole process group (the script and the browser it started), then SIGKILL
    to whatever is left after timeout_s."""
    group = proc.pid  # start_new_session: the group is the one this test created
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break  # nothing of it is left
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=5)


@pytest.fixture
def vae_service(models_dir: Path) -> Iterator[EmbeddedService]:
    settings = make_settings(models_dir, LUNA_TOKEN=TOKEN, LUNA_SLOW_REQUEST_MS="0", LUNA_VAE_PRELOAD=VAE)
    service = EmbeddedService(build_vae(settings)).start()
    try:
        yield service.wait_ready()
    finally:
        service.stop()


async def submit_token(page: Page, token: str) -> None:
    fill = f"document.querySelector('#token').value = {json.dumps(token)}"
    await page.evaluate(f"{fill}; document.querySelector('#login').submit()")


def _decode(url: str, client: str, times: int, model: str = VAE) -> None:
    with Client("vae", url=url, token=TOKEN, name=client) as vae:
        for _ in range(times):
            vae.call("decode", {"latent": torch.zeros(1, 4, 8, 8)}, {"model": model})


def _status(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def _get(url: str, **headers: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


async def test_status_page_in_a_browser_behind_the_token(
    vae_service: EmbeddedService, tmp_path: Path
) -> None:
    url = vae_service.url
    await asyncio.to_thread(_decode, url, "comfyui-a", 3)
    with pytest.raises(UnknownModel):
        await asyncio.to_thread(_decode, url, "comfyui-b", 1, "vae/missing.safetensors")

    async with browser(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=url + "/")
        await page.wait_for("document.querySelector('#login') !== null")
        assert VAE not in await page.text("body")  # nothing shown without the token
        await submit_token(page, "wrong")
        await page.wait_for("document.querySelector('#login-error') !== null")
        await submit_token(page, TOKEN)
        await page.wait_for("Number(document.body.dataset.refreshes) >= 1")

        assert "Luna Stack · vae service" in await page.text("#title")
        assert "ready" in await page.text("#meta")
        status = _status(url)
        [model] = status["models"]
        row = f"{VAE}\t{model['family']}\tfp32\tcpu\t{model['bytes'] / 2**20:.2f} MiB"
        assert row in (await page.text("#models")).splitlines()  # name, family, dtype, device, bytes
        # This host has no GPU: the page says why and charts the process's memory instead.
        assert "No GPU" in await page.text("#gpus")
        clients = await page.text("#clients")
        row_a = next(line for line in clients.splitlines() if line.startswith("comfyui-a"))
        row_b = next(line for line in clients.splitlines() if line.startswith("comfyui-b"))
        assert row_a.split("\t")[1:3] == ["3", "0"], row_a  # ok, failed
        assert row_b.split("\t")[1:3] == ["0", "1"] and "404 unknown_model" in row_b, row_b
        slow = await page.text("#slow")
        assert "POST /v1/vae/decode" in slow and "comfyui-b" in slow and "404 unknown_model" in slow
        assert "/v1/vae/{op}" in await page.text("#routes")
        queue = await page.text("#queue")
        assert "vae\t3\t1.00\t" in queue  # batched forwards (one op label), rows each
        # Where the time goes: each stage of the path with its requests (the failed one read its inputs).
        stages = {line.split("\t")[0]: line.split("\t")[1:] for line in queue.splitlines() if "\t" in line}
        assert stages["inputs"][2] == "4" and stages["compute"][2] == "3", stages
        assert float(stages["compute"][0]) > 0

        # Live: new requests show up on the next refreshes without reloading the page.
        seen = int(await page.evaluate("document.body.dataset.refreshes"))
        await asyncio.to_thread(_decode, url, "comfyui-a", 2)
        await page.wait_for(
            f"Number(document.body.dataset.refreshes) >= {seen + 2} && "
            "document.querySelector('#clients').innerText.includes('comfyui-a\\t5\\t0')"
        )
        assert await page.evaluate("document.querySelector('#banner').style.display") == "none"
        assert await page.evaluate("document.querySelector('#dot').className") == "dot"

        shot = await page.send("Page.captureScreenshot", format="png")
    png = tmp_path / "status.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    with Image.open(png) as image:
        assert image.size == (WIDTH, HEIGHT)
        rgb = image.convert("RGB")
        assert (
            len(rgb.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 100
        )  # text, tables, charts: not blank
        assert rgb.getpixel((10, 10)) == (0x1D, 0x23, 0x30)  # the header bar is drawn
    if target := os.environ.get("LUNA_STATUS_SCREENSHOT"):  # small enough to commit: a 64-colour palette
        with Image.open(png) as image:
            image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(target, optimize=True)

    # The cookie the login sets reads, never writes; without it or the bearer token the API stays closed.
    cookie = f"{page_module.COOKIE}={page_module.cookie_value(TOKEN)}"
    assert _get(url + "/v1/status") == 401
    assert _get(url + "/v1/status", Cookie=cookie) == 200
    assert _get(url + "/metrics", Cookie=cookie) == 200
    assert _get(url + "/v1/status", Authorization=f"Bearer {TOKEN}") == 200
    load = urllib.request.Request(
        url + "/v1/vae/unload", data=json.dumps({"model": VAE}).encode(), method="POST"
    )
    load.add_header("Content-Type", "application/json")
    load.add_header("Cookie", cookie)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(load, timeout=10)
    assert refused.value.code == 401


def test_activity_keeps_a_bounded_table_of_clients_and_ring_of_slow_requests() -> None:
    activity = Activity(slow_ms=100)
    for i in range(MAX_CLIENTS + 5):
        activity.record("POST", "/v1/vae/decode", f"client-{i}", 200, "ok", 0.01)
    activity.record("POST", "/v1/vae/decode", "client-0", 404, "unknown_model", 0.2)  # seen again: kept
    clients = activity.clients()
    # the 5 seen longest ago made room, then client-5 for client-0 coming back
    assert len(clients) == MAX_CLIENTS and "client-5" not in clients and "client-6" in clients
    assert clients["client-0"] | {"first_seen": 0, "last_seen": 0} == {
        "ok": 0,
        "failed": 1,
        "seconds": 0.2,
        "first_seen": 0,
        "last_seen": 0,
        "last_error": "404 unknown_model",
    }
    for i in range(SLOW_KEPT + 3):
        activity.record("POST", f"/v1/vae/{i}", "c", 200, "ok", 0.1 + i / 1000)
    slow = activity.slow()
    assert len(slow) == SLOW_KEPT and slow[0]["path"] == f"/v1/vae/{SLOW_KEPT + 2}"  # most recent first
    assert all(r["ms"] >= 100 for r in slow)
