"""Shared test fixtures: a real redis-server, small random-weight models, real services on 127.0.0.1."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from luna_stack.config import Settings, load_settings
from luna_stack.devtools.embedded import EmbeddedService, free_port
from luna_stack.devtools.fixtures import write_models_dir
from luna_stack.devtools.localrun import spawn_service, start_redis_server, wait_ready
from luna_stack.server.service import Service

from .comfyui_harness import comfy  # noqa: F401  (session-wide: ComfyUI imports once per process)


@dataclasses.dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def start_redis(tmp: Path, *, port: int | None = None, durable: bool = False, **options: Any) -> RedisServer:
    """A redis-server of this test's own in `tmp` (options: those of localrun.start_redis_server; the
    same port and directory again restart it on its append-only file)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server (the tests need a real one)")
    port = port or free_port()
    proc = start_redis_server(port, tmp, durable=durable, **options)
    password = options.get("password")
    auth = f":{password}@" if password else ""
    server = RedisServer(f"redis://{auth}127.0.0.1:{port}/0", port, proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client().ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's redis-server."""
    server_client = redis_server.client()
    server_client.flushdb()
    server_client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small random-weight models in ComfyUI layout (checkpoints/, vae/, clip/, unet/, loras/, ...)."""
    root = tmp_path_factory.mktemp("models")
    write_models_dir(root, size="small", families=("sd15", "sdxl"), dtype=torch.float32)
    return root


def make_settings(models: Path, **env: str) -> Settings:
    """Settings as a service would load them, from a clean environment plus `env`."""
    base = {"LUNA_MODEL_ROOTS": str(models), "LUNA_DEVICE": "cpu", "LUNA_DTYPE": "fp32"}
    return load_settings(None, env={**base, **env})


@pytest.fixture
def start_service() -> Iterator[Callable[..., EmbeddedService]]:
    """start_service(build_fn, settings) -> a ready EmbeddedService, stopped after the test."""
    running: list[EmbeddedService] = []

    def start(
        build: Callable[[Settings], Service], settings: Settings, ready: bool = True
    ) -> EmbeddedService:
        svc = EmbeddedService(build(settings)).start()
        running.append(svc)
        if ready:
            svc.wait_ready()
        return svc

    yield start
    for svc in running:
        with contextlib.suppress(Exception):
            svc.stop()


@dataclasses.dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServiceProcess]]:
    """serve_process(kind, models, **env) -> `luna-stack serve <kind>` as its own process, once ready.
    CUDA IPC needs this: a process cannot open its own IPC handles."""
    running: list[ServiceProcess] = []

    def start(kind: str, models: Path, **env: str) -> ServiceProcess:
        port = free_port()
        child_env = {
            **os.environ,
            "LUNA_MODEL_ROOTS": str(models),
            "LUNA_PORT": str(port),
            "LUNA_LOG_LEVEL": "info",
            **env,
        }
        if "LUNA_REDIS_URL" not in env:
            child_env.pop("LUNA_REDIS_URL", None)
        proc = spawn_service(kind, child_env)
        service = ServiceProcess(f"http://127.0.0.1:{port}", proc)
        running.append(service)
        try:
            wait_ready(kind, service.url, proc, timeout_s=180)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        return service

    yield start
    for service in running:
        service.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=20)
        if service.process.poll() is None:
            service.process.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """own_redis(**options) -> a redis-server for this test alone (to kill, restart or fill), in
    tmp_path/redis; own_redis(port=server.port, ...) restarts one on the same files. Killed at the end."""
    started: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        server = start_redis(tmp_path / "redis", **options)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)
