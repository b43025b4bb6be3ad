"""CUDA IPC, service side: clients' exchange buffers opened once and cached; request tensors are views
into them and outputs are written into them, so no tensor byte crosses the socket.

The exchange (client side: client/ipc.py; shared constants: wire/ipc.py):

- `POST /v1/ipc/buffers` JSON `{"client", "gpu_uuid", "handle": hex, "nbytes", "pid", "pid_ns",
  "started"}` opens a buffer the client allocated and exported once -> `{"buffer": id}`. A 409
  `ipc_unavailable` says why IPC cannot work (CPU service, another GPU, no shared IPC namespace); the
  client then stays on HTTP and logs that reason.
- A request's params carry `"_ipc": {"inputs": {name: [buffer, offset, dtype, shape]}, "out": buffer}`.
- The reply's params carry `"_ipc": {"outputs": {name: [offset, dtype, shape]}, "needed": bytes}`.
  Outputs that did not fit travel in the body as usual and `needed` tells the client how large its output
  buffer must grow.
- Ordering without host synchronisation: an output buffer may be registered with `"ready_event"`, the
  IPC handle of an interprocess CUDA event the client records after writing a request's inputs; the
  service polls it from the host before the request goes on (no stream of the service waits on a client's
  GPU work; should polling not see it complete, the service's streams wait on it instead), and the
  registration reply's `"done_event"` is an event the service records after writing
  the outputs, which the client's stream waits on before reading them.
  So the reply leaves as soon as the outputs are queued, and neither side blocks on the GPU. Without
  events (an older peer) the client synchronises before sending and the service before replying.
- `DELETE /v1/ipc/buffers/{id}` closes one. Buffers idle for `ipc_idle_s`, or whose owner process is
  gone (checked when client and service share a PID namespace), are closed by `reap()`; a request for
  a closed buffer gets `unknown_ipc_buffer` and the client registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from luna_stack.gpu.cuda_ipc import HANDLE_BYTES, OpenedBuffer
from luna_stack.server.executor import GpuExecutor
from luna_stack.wire.errors import BadRequest, IpcUnavailable, UnknownIpcBuffer
from luna_stack.wire.ipc import ALIGN, IPC_DTYPES, aligned, pid_namespace, process_started
from luna_stack.wire.tensors import dtype_name

log = logging.getLogger(__name__)
READY_POLL_S = 0.25  # how long a request's inputs may take to be written before streams wait instead


@dataclass
class Events:
    """The GPU-side ordering of one output buffer's requests (see the protocol above)."""

    ready: torch.cuda.Event  # the client's: recorded after it wrote a request's inputs
    done: torch.cuda.Event  # ours: recorded after the request's outputs are written
    polled: bool = True  # `ready` is polled from the host; False once it was not seen complete in time

    @classmethod
    def open(cls, ready_handle: bytes, device: torch.device) -> Events:
        ready = torch.cuda.Event.from_ipc_handle(device, ready_handle)
        with torch.cuda.device(device):
            done = torch.cuda.Event(interprocess=True)
            done.record()  # created now, so its handle exists before the first request
        return cls(ready, done)


@dataclass
class _Mapped:
    opened: OpenedBuffer
    client: str
    pid: int | None  # set only when the owner shares our PID namespace
    started: str | None
    last_used: float
    events: Events | None = None
    in_use: int = 0

    def owner_gone(self) -> bool:
        return self.pid is not None and process_started(self.pid) != self.started


class Sink:
    """Where a request's outputs go. Runners call `put` on the compute thread right after computing, so
    a captured graph's static output is copied out before the next replay overwrites it.

    This one, to the host: the copy is queued (into pinned memory) behind the batch, so the compute
    thread can queue the next batch meanwhile; the batcher hands the result back once the device has
    run the batch (`early` False)."""

    early = False

    def put(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cpu", non_blocking=True)


HOST = Sink()


class IpcSink(Sink):
    """Writes outputs into the client's output buffer; what does not fit goes to the host instead (then
    synchronously). The reply may leave at launch: the client reads behind the `done` event."""

    early = True

    def __init__(self, out: torch.Tensor, done: torch.cuda.Event | None = None):
        self.out = out
        self.done = done
        self.placed: dict[str, list[Any]] = {}
        self._starts: dict[str, int] = {}  # a retried request puts again: same name, same place
        self.needed = 0  # bytes all outputs of this request take, aligned as placed

    def put(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        start = self._starts.setdefault(name, aligned(self.needed))
        nbytes = tensor.numel() * tensor.element_size()
        self.needed = max(self.needed, start + nbytes)
        if start + nbytes > self.out.numel() or tensor.dtype not in IPC_DTYPES.values():
            self.placed.pop(name, None)
            return tensor.to("cpu")
        dst = self.out[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
        dst.copy_(tensor)
        if dst.is_cuda:  # the reply goes out once this returns: the client must find the bytes there
            stream = torch.cuda.current_stream(dst.device)
            if self.done is not None:
                self.done.record(stream)  # the client's stream waits on it: no host synchronisation
            else:
                stream.synchronize()
        self.placed[name] = [start, dtype_name(tensor.dtype), list(tensor.shape)]
        return dst

    def reply(self) -> dict[str, Any]:
        return {"outputs": self.placed, "needed": self.needed}


class IpcBuffers:
    """The buffers clients registered with this service, opened and cached until released or reaped."""

    def __init__(
        self,
        device: torch.device,
        gpu_uuid: str | None,
        executor: GpuExecutor,
        idle_s: float,
    ):
        self.device = device
        self.gpu_uuid = gpu_uuid
        self.executor = executor
        self.idle_s = idle_s
        self._buffers: dict[str, _Mapped] = {}
        self._pid_ns = pid_namespace()
        self._side: torch.cuda.Stream | None = None
        self.opened_total = 0
        self.closed_total = 0

    @property
    def enabled(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "buffers": len(self._buffers),
            "mapped_bytes": sum(m.opened.nbytes for m in self._buffers.values()),
            "clients": len({m.client for m in self._buffers.values()}),
            # Output buffers ordered by CUDA events (no host synchronisation on either side).
            "evented": sum(m.events is not None for m in self._buffers.values()),
            "opened_total": self.opened_total,
            "closed_total": self.closed_total,
        }

    # -- registration -------------------------------------------------------------------------------
    async def register(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            raise IpcUnavailable(f"this service computes on {self.device}, not a GPU")
        client_uuid = body.get("gpu_uuid")
        if client_uuid != self.gpu_uuid:
            raise IpcUnavailable(
                f"the client's GPU {client_uuid} is not this service's GPU {self.gpu_uuid}",
                hint="IPC needs the same physical GPU; tensors go over HTTP instead",
            )
        try:
            handle = bytes.fromhex(str(body.get("handle", "")))
            nbytes = int(body["nbytes"])
            client = str(body["client"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest('send {"client", "gpu_uuid", "handle": hex, "nbytes"}') from None
        if len(handle) != HANDLE_BYTES or nbytes <= 0:
            raise BadRequest(f"an IPC handle has {HANDLE_BYTES} bytes and the buffer a positive size")
        ready = _event_handle(body.get("ready_event"))
        try:
            opened = await self.executor.run(OpenedBuffer.open, handle, nbytes, self.device)
        except IpcUnavailable as exc:
            raise IpcUnavailable(
                exc.message,
                hint="client and service must share the host IPC namespace (compose: ipc: host) and GPU",
            ) from None
        same_ns = body.get("pid_ns") is not None and body.get("pid_ns") == self._pid_ns
        pid = int(body["pid"]) if same_ns and isinstance(body.get("pid"), int) else None
        started = str(body.get("started")) if pid is not None else None
        events = None
        if ready is not None:
            try:
                events = await self.executor.run(Events.open, ready, self.device)
            except RuntimeError as exc:  # the event handle does not open here: synchronise instead
                log.warning("IPC: client %s's event does not open (%s); synchronising instead", client, exc)
        buffer_id = uuid.uuid4().hex
        self._buffers[buffer_id] = _Mapped(opened, client, pid, started, time.monotonic(), events)
        self.opened_total += 1
        log.info("IPC: opened %.1f MiB buffer %s of client %s", nbytes / 2**20, buffer_id[:8], client)
        reply: dict[str, Any] = {"buffer": buffer_id}
        if events is not None:
            reply["done_event"] = bytes(events.done.ipc_handle()).hex()
        return reply

    async def release(self, buffer_id: str, client: str) -> bool:
        mapped = self._buffers.get(buffer_id)
        if mapped is None or mapped.client != client:
            return False
        await self._close(buffer_id)
        return True

    async def _close(self, buffer_id: str) -> None:
        mapped = self._buffers.pop(buffer_id)
        await self.executor.run(mapped.opened.close)
        self.closed_total += 1

    async def reap(self) -> int:
        """Close buffers whose owner died or that sat idle too long; returns how many were closed."""
        now = time.monotonic()
        stale = [
            buffer_id
            for buffer_id, m in self._buffers.items()
            if m.in_use == 0 and (m.owner_gone() or now - m.last_used > self.idle_s)
        ]
        for buffer_id in stale:
            log.info("IPC: closing buffer %s of client %s", buffer_id[:8], self._buffers[buffer_id].client)
            await self._close(buffer_id)
        return len(stale)

    async def close_all(self) -> None:
        for buffer_id in list(self._buffers):
            await self._close(buffer_id)

    # -- requests -----------------------------------------------------------------------------------
    def _lease(self, buffer_id: Any, client: str) -> _Mapped:
        mapped = self._buffers.get(buffer_id) if isinstance(buffer_id, str) else None
        if mapped is None or mapped.client != client:
            raise UnknownIpcBuffer(
                f"IPC buffer {buffer_id!r} is not open for client {client!r}",
                hint="it was released or reaped; register it again",
            )
        return mapped

    @contextlib.asynccontextmanager
    async def request(self, spec: Any, client: str) -> AsyncIterator[tuple[dict[str, torch.Tensor], IpcSink]]:
        """Input views and the output sink of one request; its buffers cannot be reaped meanwhile."""
        if not self.enabled:
            raise IpcUnavailable(f"this service computes on {self.device}, not a GPU")
        if not isinstance(spec, dict) or not isinstance(spec.get("inputs", {}), dict):
            raise BadRequest('params._ipc must be {"inputs": {name: [buffer, offset, dtype, shape]}, "out"}')
        leased = [self._lease(spec.get("out"), client)]
        inputs = {}
        for name, where in spec.get("inputs", {}).items():
            if not (isinstance(where, list) and len(where) == 4):
                raise BadRequest(f"params._ipc.inputs.{name} must be [buffer, offset, dtype, shape]")
            mapped = self._lease(where[0], client)
            leased.append(mapped)
            inputs[name] = _view(mapped.opened.tensor, name, *where[1:])
        for mapped in leased:
            mapped.in_use += 1
            mapped.last_used = time.monotonic()
        events = leased[0].events
        try:
            if events is not None:
                await self._written(events, client)
            yield inputs, IpcSink(leased[0].opened.tensor, events.done if events is not None else None)
        finally:
            for mapped in leased:
                mapped.in_use -= 1

    async def _written(self, events: Events, client: str) -> None:
        """Until the client's inputs are written. Its `ready` event is polled from the host, so no stream of
        this service depends on a client's GPU work (a client whose event never completes holds up only its
        own request). Should a buffer's event not complete within READY_POLL_S, this service's streams wait
        on that buffer's events on the GPU from then on (the ordering the polling replaces; logged)."""
        ready = events.ready
        if events.polled:
            deadline = time.monotonic() + READY_POLL_S
            pause = 1e-4
            while not _complete(ready):  # the pack synchronises before it sends: usually done at once
                if time.monotonic() > deadline:
                    events.polled = False
                    log.warning(
                        "IPC: client %s's inputs were not written within %.2f s of its request; this "
                        "service's streams wait on that buffer's ready event from now on",
                        client,
                        READY_POLL_S,
                    )
                    break
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2e-3)
            else:
                return
        torch.cuda.current_stream(self.device).wait_event(ready)  # the finiteness check reads them here
        torch.cuda.default_stream(self.device).wait_event(ready)  # and the compute thread here

    async def put_rest(self, sink: IpcSink, tensors: Mapping[str, torch.Tensor]) -> None:
        """Place outputs a service returned without putting them (host tensors, cached results), on a
        stream of their own so the copy does not wait behind the next forward (device tensors wait for
        what the compute stream has queued so far, which may include a batch queued behind)."""
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)

        def put_all() -> None:
            if any(t.is_cuda for t in tensors.values()):  # host tensors are complete already
                self._side.wait_stream(torch.cuda.default_stream(self.device))  # what computed them
            with torch.cuda.stream(self._side):
                for name, tensor in tensors.items():
                    if name not in sink.placed:
                        sink.put(name, tensor)

        await asyncio.to_thread(put_all)


def _complete(event: torch.cuda.Event) -> bool:
    try:
        return event.query()
    except RuntimeError as exc:  # the exporting process is gone, or its context broke
        raise UnknownIpcBuffer(
            f"the IPC buffer's ready event cannot be read ({exc})", hint="register the buffers again"
        ) from None


def _event_handle(value: Any) -> bytes | None:
    """A client's `ready_event` handle (hex), None when it sent none."""
    if value is None:
        return None
    try:
        handle = bytes.fromhex(str(value))
    except ValueError:
        raise BadRequest("ready_event must be the hex of a CUDA IPC event handle") from None
    if len(handle) != HANDLE_BYTES:
        raise BadRequest(f"a CUDA IPC event handle has {HANDLE_BYTES} bytes, got {len(handle)}")
    return handle


def _view(memory: torch.Tensor, name: str, offset: Any, dtype: Any, shape: Any) -> torch.Tensor:
    if dtype not in IPC_DTYPES:
        raise BadRequest(f"IPC input {name!r}: dtype {dtype!r} is not one of {sorted(IPC_DTYPES)}")
    if not isinstance(offset, int) or offset < 0 or offset % ALIGN:
        raise BadRequest(f"IPC input {name!r}: offset must be a non-negative multiple of {ALIGN}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"IPC input {name!r}: shape must be a list of non-negative integers")
    torch_dtype = IPC_DTYPES[dtype]
    nbytes = torch.Size(shape).numel() * torch_dtype.itemsize
    if offset + nbytes > memory.numel():
        raise BadRequest(
            f"IPC input {name!r}: {nbytes} bytes at offset {offset} run past the buffer's {memory.numel()}"
        )
    return memory[offset : offset + nbytes].view(torch_dtype).view(shape)
