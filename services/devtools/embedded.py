"""Run a service's real aiohttp server on 127.0.0.1 inside this process (a background thread with its own
event loop). Tests and benchmarks use it to talk to a service over real sockets without a subprocess."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request

from aiohttp import web

from luna_stack.server.app import SERVER_OPTIONS, create_app
from luna_stack.server.service import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedService:
    def __init__(self, service: Service, port: int | None = None):
        self.service = service
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{service.kind}-server", daemon=True
        )

    @property
    def app(self) -> web.Application:
        """The running aiohttp application (tests read the state its routes keep)."""
        assert self._runner is not None, "start() first"
        return self._runner.app

    def start(self) -> EmbeddedService:
        self._thread.start()

        async def up() -> None:
            self._runner = web.AppRunner(create_app(self.service, self.port), **SERVER_OPTIONS)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(up(), self._loop).result(timeout=30)
        return self

    def wait_ready(self, timeout: float = 120) -> EmbeddedService:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except urllib.error.HTTPError as err:
                body = err.read().decode()
                if "preload failed" in body:
                    raise RuntimeError(f"{self.url} cannot become ready: {body}") from None
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready after {timeout} s")

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedService:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
