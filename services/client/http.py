"""Python client for the services, async (`AsyncClient`) and sync (`Client`).

It finds a service by a configured URL or through the Redis registry, keeps one keep-alive connection
pool per client, sends tensors with the wire codec and raises the same typed errors the service raised
(luna_stack.wire.errors). comfy_nodes uses the sync client from ComfyUI's worker thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import torch

from luna_stack.client.held import HeldInputs
from luna_stack.client.ipc import IpcTransport
from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.jobs.registry import Registry, ReplicaInfo
from luna_stack.wire import codec
from luna_stack.wire.contract import CLIENT_HEADER, HELD_PARAM, default_url
from luna_stack.wire.errors import LunaError, Unavailable, UnknownReference, error_from_json

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]


class AsyncClient:
    def __init__(
        self,
        kind: str,
        *,
        url: str | None = None,
        redis_url: str | None = None,
        token: str | None = None,
        timeout_s: float = 600.0,
        name: str | None = None,
        ipc: str | None = None,
    ):
        self.kind = kind
        env_url = os.environ.get(f"LUNA_{kind.upper()}_URL")
        self.redis_url = redis_url or os.environ.get("LUNA_REDIS_URL")
        self._fixed_url = (url or env_url or "").rstrip("/") or None
        if self._fixed_url is None and self.redis_url is None:
            self._fixed_url = default_url(kind)
        self.token = token if token is not None else os.environ.get("LUNA_TOKEN")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
        self.name = name or f"client-{uuid.uuid4().hex[:8]}"
        self._session: aiohttp.ClientSession | None = None
        self._redis = None
        self._registry: Registry | None = None
        self._replica: ReplicaInfo | None = None
        self.ipc_mode = ipc or os.environ.get("LUNA_IPC", "auto")
        if self.ipc_mode not in ("auto", "off"):
            raise ValueError(f"ipc must be 'auto' or 'off', got {self.ipc_mode!r}")
        self.ipc = IpcTransport(kind, self._json_call, self._http_call)
        self.held = HeldInputs()
        # Tensor bodies over HTTP (IPC calls: their small bodies), what a wire-cost benchmark reads.
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- connection management ------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {CLIENT_HEADER: self.name}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # One pool, keep-alive: per-request connection set-up would cost more than a small step.
            connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, headers=self._headers()
            )
        return self._session

    def _redis_client(self):
        if self._redis is None:
            if not self.redis_url:
                raise Unavailable(
                    "no Redis configured for this client", hint="pass redis_url or LUNA_REDIS_URL"
                )
            self._redis = connect(self.redis_url)
        return self._redis

    async def replicas(self) -> list[ReplicaInfo]:
        """Replicas whose registry entry is authenticated (signed with this client's token; without a
        token, loopback addresses only): the only addresses the bearer token is ever sent to, besides
        a URL given explicitly."""
        if self._registry is None:
            self._registry = Registry(self._redis_client(), token=self.token)
        return await self._registry.replicas(self.kind)

    async def base_url(self) -> str:
        if self._fixed_url:
            return self._fixed_url
        if self._replica is None:
            live = await self.replicas()
            if not live:
                raise Unavailable(
                    f"no {self.kind} service is registered in Redis",
                    hint=f"start one (luna-stack serve {self.kind}) or give the client its URL",
                    details={"url": self.redis_url, "reason": "no replica registered"},
                )
            self._replica = min(live, key=lambda r: r.load.get("queue", 0))
        return self._replica.url

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self.ipc.close()
        if self._session is not None:
            await self._session.close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
            self._registry = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ---------------------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        json_body: Any = None,
        expect_tensors: bool = False,
    ) -> Any:
        base = await self.base_url()
        session = await self._http()
        headers = {"Content-Type": codec.CONTENT_TYPE} if data is not None else {}
        try:
            async with session.request(
                method, base + path, data=data, json=json_body, headers=headers
            ) as resp:
                if resp.status >= 400:
                    try:
                        body = await resp.json(content_type=None)
                    except (aiohttp.ContentTypeError, ValueError):
                        body = (await resp.text())[:500]
                    raise error_from_json(resp.status, body)
                if resp.content_type == codec.CONTENT_TYPE:
                    blob = await resp.read()
                    self.bytes_received += len(blob)
                    return resp.status, codec.decode(blob)
                if expect_tensors and resp.status == 200:
                    raise LunaError(f"{base}{path} answered {resp.content_type}, not tensors")
                return resp.status, await resp.json(content_type=None)
        except aiohttp.ClientConnectionError as exc:
            self._replica = None  # rediscover next time: the replica may have moved or died
            raise Unavailable(
                f"cannot reach the {self.kind} service at {base}: {exc}",
                hint=f"is it running? check `luna-stack status` or {base}/health/ready",
                details={"url": base, "reason": _connection_reason(exc)},
            ) from None
        except asyncio.TimeoutError:
            waited = f"no answer within {self.timeout.total:.0f} s"
            raise Unavailable(
                f"the {self.kind} service at {base} did not answer within {self.timeout.total:.0f} s",
                details={"url": base, "reason": waited},
            ) from None

    async def call(
        self,
        op: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        keep: Sequence[str] = (),
    ) -> tuple[Tensors, dict[str, Any]]:
        """POST /v1/<kind>/<op> and return (tensors, params) of the reply.

        Outputs come back on `device`, by default the device of the first GPU input (else the CPU). When
        that GPU is the service's own, tensors move through CUDA IPC instead of the socket. `keep` names
        sticky inputs (conditioning): sent once, then referred to while they stay equal (client/held.py)."""
        tensors = dict(tensors or {})
        params = dict(params or {})
        target = torch.device(device) if device is not None else _first_gpu(tensors)
        if target is not None and target.type == "cuda":
            target = _indexed(target)
        if not keep:
            return await self._send(op, tensors, params, target)

        async def held_call() -> tuple[Tensors, dict[str, Any]]:
            plan = self.held.plan(tensors, keep)
            out, out_params = await self._send(op, plan.tensors, {**params, HELD_PARAM: plan.param()}, target)
            self.held.confirm(plan, out_params.pop(HELD_PARAM, None))
            return out, out_params

        try:
            return await held_call()
        except UnknownReference:
            # The service restarted or dropped what it held: everything once more, in full.
            self.held.forget()
            self.held.counts.resent += 1
            return await held_call()

    async def _send(
        self, op: str, tensors: Tensors, params: dict[str, Any], target: torch.device | None
    ) -> tuple[Tensors, dict[str, Any]]:
        if target is not None and target.type == "cuda" and self.ipc_mode == "auto":
            result = await self.ipc.call(op, tensors, params, target)
            if result is not None:
                return result
        out, out_params = await self._http_call(op, tensors, params)
        if target is not None:
            out = {name: t.to(target) for name, t in out.items()}
        return out, out_params

    async def ipc_usable(self, device: torch.device | str) -> bool:
        """Whether tensors on `device` would travel to this service through CUDA IPC."""
        device = torch.device(device)
        if self.ipc_mode == "off" or device.type != "cuda":
            return False
        return await self.ipc.check_service(_indexed(device))

    async def _http_call(
        self, op: str, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
    ) -> tuple[Tensors, dict[str, Any]]:
        blob = codec.encode(tensors, params)
        self.bytes_sent += len(blob)
        _status, result = await self._request("POST", f"/v1/{self.kind}/{op}", data=blob, expect_tensors=True)
        return result

    async def _json_call(self, method: str, path: str, body: Any) -> Any:
        return (await self._request(method, path, json_body=body))[1]

    async def get_json(self, path: str) -> Any:
        return (await self._request("GET", path))[1]

    async def status(self) -> dict[str, Any]:
        return await self.get_json("/v1/status")

    async def submit(
        self,
        op: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue a job (durable: it survives the death of the replica that takes it); returns its id."""
        blob = codec.encode(tensors or {}, params)
        if self.redis_url:
            return await JobQueue(self._redis_client(), self.kind).submit(op, blob)
        _status, body = await self._request("POST", f"/v1/{self.kind}/jobs/{op}", data=blob)
        return body["job_id"]

    async def wait(self, job_id: str, timeout_s: float = 600.0) -> tuple[Tensors, dict[str, Any]]:
        if self.redis_url:
            blob = await JobQueue(self._redis_client(), self.kind).result(job_id, timeout_s=timeout_s)
            return codec.decode(blob)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            wait = max(1.0, min(30.0, deadline - loop.time()))
            status, result = await self._request("GET", f"/v1/jobs/{job_id}?wait={wait:.0f}")
            if status == 200:
                return result
            if loop.time() >= deadline:
                raise Unavailable(f"job {job_id} still {result.get('state')} after {timeout_s:.0f} s")


def _connection_reason(exc: aiohttp.ClientConnectionError) -> str:
    """'connection refused', 'name or service not known'...: the OS's words, without aiohttp's wrapping."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.errno and os_error.errno > 0:
        return os.strerror(os_error.errno).lower()
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror.lower()  # getaddrinfo's errors have negative numbers
    return str(exc) or type(exc).__name__


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current>: IPC state is kept per GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def _first_gpu(tensors: Mapping[str, torch.Tensor]) -> torch.device | None:
    return next((t.device for t in tensors.values() if t.device.type == "cuda"), None)


class Client:
    """Blocking facade over AsyncClient: one private event loop thread, usable from any thread."""

    def __init__(self, kind: str, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"luna-{kind}-client", daemon=True
        )
        self._thread.start()
        self.aio = AsyncClient(kind, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(
        self,
        op: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        keep: Sequence[str] = (),
    ) -> tuple[Tensors, dict[str, Any]]:
        return self._run(self.aio.call(op, tensors, params, device=device, keep=keep))

    def status(self) -> dict[str, Any]:
        return self._run(self.aio.status())

    def ipc_usable(self, device: torch.device | str) -> bool:
        return self._run(self.aio.ipc_usable(device))

    def get_json(self, path: str) -> Any:
        return self._run(self.aio.get_json(path))

    def submit(
        self,
        op: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        return self._run(self.aio.submit(op, tensors, params))

    def wait(self, job_id: str, timeout_s: float = 600.0) -> tuple[Tensors, dict[str, Any]]:
        return self._run(self.aio.wait(job_id, timeout_s))

    def close(self) -> None:
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
