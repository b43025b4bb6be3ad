"""CUDA IPC, client side: tensors on the service's own GPU travel through exchange buffers the client
owns, allocates once, exports once and reuses; only parameters cross the socket (protocol: ipc.py).

A call takes an idle channel (a registered input buffer and output buffer; one per concurrent call),
copies its GPU inputs into the input buffer, records the channel's `ready` event and sends their places.
The reply says where the outputs lie in the output buffer; this stream waits on the service's `done` event
and clones them out (a device-to-device copy) so the buffer can serve the next call. Neither side blocks
on the GPU for the exchange (a service without events: the client synchronises instead); the pack's held
inputs (client/held.py) compare each step's sticky tensors with `torch.equal`, which does. Whenever IPC
cannot work the call goes over HTTP and the reason is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from luna_stack.gpu.cuda_ipc import ExportedBuffer
from luna_stack.gpu.device import gpu_uuid
from luna_stack.wire.errors import IpcUnavailable, LunaError, UnknownIpcBuffer
from luna_stack.wire.ipc import IPC_DTYPES, PARAM, aligned, pid_namespace, process_started
from luna_stack.wire.tensors import dtype_name

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
MIN_BUFFER = 1 << 20
MAX_CHANNELS = 4  # concurrent IPC calls per client and GPU; more wait for a free channel
# (method, path, json body) -> parsed JSON reply; raises the service's typed errors
JsonCall = Callable[[str, str, Any], Awaitable[Any]]
# (op, host tensors, params) -> (tensors, params) of the reply
OpCall = Callable[[str, Mapping[str, torch.Tensor], Mapping[str, Any]], Awaitable[tuple[Tensors, dict]]]


def _grown(current: int, needed: int) -> int:
    size = max(needed, 2 * current, MIN_BUFFER)
    return (size + MIN_BUFFER - 1) // MIN_BUFFER * MIN_BUFFER


@dataclass
class _Events:
    ready: torch.cuda.Event  # ours: recorded after writing a call's inputs
    done: torch.cuda.Event  # the service's: recorded after it wrote the outputs


@dataclass
class _Buffer:
    memory: ExportedBuffer
    id: str
    events: _Events | None = None  # output buffers, when the service orders them by events


class _Channel:
    def __init__(self, device: torch.device):
        self.device = device
        self.inputs: _Buffer | None = None
        self.outputs: _Buffer | None = None


class IpcTransport:
    """The IPC side of one AsyncClient: whether IPC applies per GPU, and the channels in use."""

    def __init__(self, kind: str, json_call: JsonCall, op_call: OpCall):
        self.kind = kind
        self._json = json_call
        self._op = op_call
        self._off: dict[torch.device, str] = {}  # device -> why tensors there go over HTTP
        self._idle: dict[torch.device, asyncio.Queue[_Channel]] = {}
        self._channels: list[_Channel] = []
        self.calls = 0

    def disabled_reason(self, device: torch.device) -> str | None:
        return self._off.get(device)

    def _fall_back(self, device: torch.device, reason: str) -> None:
        if device not in self._off:
            log.warning("%s: CUDA IPC off for %s, tensors go over HTTP: %s", self.kind, device, reason)
        self._off[device] = reason

    async def check_service(self, device: torch.device) -> bool:
        if device in self._off:
            return False
        if device in self._idle:
            return True
        status = await self._json("GET", "/v1/status", None)
        service_gpu, ipc = status.get("gpu_uuid"), status.get("ipc") or {}
        mine = gpu_uuid(device)
        if not ipc.get("enabled"):
            self._fall_back(device, f"the service runs on {status.get('device')}, not a GPU")
        elif service_gpu != mine:
            self._fall_back(device, f"the service's GPU {service_gpu} is not this client's {mine}")
        else:
            self._idle[device] = asyncio.Queue()
        return device not in self._off

    async def _register(self, device: torch.device, nbytes: int, evented: bool = False) -> _Buffer:
        memory = await asyncio.to_thread(ExportedBuffer.allocate, device, nbytes)
        ready = _interprocess_event(device) if evented else None
        body = {
            "gpu_uuid": gpu_uuid(device),
            "handle": memory.handle.hex(),
            "nbytes": nbytes,
            "pid": os.getpid(),
            "pid_ns": pid_namespace(),
            "started": process_started(os.getpid()),
            **({"ready_event": bytes(ready.ipc_handle()).hex()} if ready is not None else {}),
        }
        try:
            reply = await self._json("POST", "/v1/ipc/buffers", body)
        except BaseException:
            await asyncio.to_thread(memory.free)
            raise
        events = None
        if ready is not None and reply.get("done_event"):
            try:
                done = torch.cuda.Event.from_ipc_handle(device, bytes.fromhex(reply["done_event"]))
            except RuntimeError as exc:  # the service writes behind an event we cannot wait on: not usable
                await self._release(_Buffer(memory, reply["buffer"], None))
                raise IpcUnavailable(f"the service's CUDA event does not open here ({exc})") from None
            events = _Events(ready, done)
        return _Buffer(memory, reply["buffer"], events)

    async def _release(self, buffer: _Buffer | None) -> None:
        if buffer is None:
            return
        try:
            await self._json("DELETE", f"/v1/ipc/buffers/{buffer.id}", None)
        except LunaError as exc:  # the service may be gone; our memory is freed either way
            log.debug("releasing IPC buffer %s: %s", buffer.id[:8], exc)
        await asyncio.to_thread(buffer.memory.free)

    async def _ensure(self, channel: _Channel, attr: str, nbytes: int) -> _Buffer:
        buffer: _Buffer | None = getattr(channel, attr)
        if buffer is None or buffer.memory.nbytes < nbytes:
            size = _grown(buffer.memory.nbytes if buffer else 0, nbytes)
            await self._release(buffer)
            setattr(channel, attr, None)
            buffer = await self._register(channel.device, size, evented=attr == "outputs")
            setattr(channel, attr, buffer)
        return buffer

    async def _acquire(self, device: torch.device) -> _Channel:
        idle = self._idle[device]
        if idle.empty() and sum(c.device == device for c in self._channels) < MAX_CHANNELS:
            channel = _Channel(device)
            self._channels.append(channel)
            return channel
        return await idle.get()

    async def call(
        self, op: str, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any], device: torch.device
    ) -> tuple[Tensors, dict[str, Any]] | None:
        """The reply with its tensors on `device`, or None when IPC does not apply (then use HTTP)."""
        if not await self.check_service(device):
            return None
        channel = await self._acquire(device)
        try:
            try:
                return await self._call(channel, op, tensors, params)
            except UnknownIpcBuffer:
                # The service restarted or reaped our buffers: map them again, once.
                await self._release(channel.inputs)
                await self._release(channel.outputs)
                channel.inputs = channel.outputs = None
                return await self._call(channel, op, tensors, params)
        except IpcUnavailable as exc:
            self._fall_back(device, exc.message)
            return None
        finally:
            self._idle[device].put_nowait(channel)

    async def _call(
        self, channel: _Channel, op: str, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
    ) -> tuple[Tensors, dict[str, Any]]:
        device = channel.device
        on_gpu = {n: t for n, t in tensors.items() if t.device == device and t.dtype in IPC_DTYPES.values()}
        host = {n: t for n, t in tensors.items() if n not in on_gpu}
        places, end = {}, 0
        for name, t in on_gpu.items():
            start = aligned(end)
            places[name] = start
            end = start + t.numel() * t.element_size()
        inputs = await self._ensure(channel, "inputs", end)
        outputs = await self._ensure(channel, "outputs", MIN_BUFFER)
        for name, t in on_gpu.items():
            start = places[name]
            nbytes = t.numel() * t.element_size()
            inputs.memory.tensor[start : start + nbytes].view(t.dtype).view(t.shape).copy_(t)
        # The service reads them on its own streams in its own process, after they are written.
        stream = torch.cuda.current_stream(device)
        if outputs.events is not None:
            outputs.events.ready.record(stream)
        else:
            stream.synchronize()
        spec = {
            "inputs": {
                n: [inputs.id, places[n], dtype_name(t.dtype), list(t.shape)] for n, t in on_gpu.items()
            },
            "out": outputs.id,
        }
        out, out_params = await self._op(op, host, {**params, PARAM: spec})
        reply = out_params.pop(PARAM, {})
        if outputs.events is not None and reply.get("outputs"):
            stream.wait_event(outputs.events.done)  # the service queued the writes; read after them
        memory = outputs.memory.tensor
        for name, (start, dtype, shape) in reply.get("outputs", {}).items():
            nbytes = torch.Size(shape).numel() * IPC_DTYPES[dtype].itemsize
            out[name] = memory[start : start + nbytes].view(IPC_DTYPES[dtype]).view(shape).clone()
        out = {name: t.to(device) for name, t in out.items()}  # outputs that overflowed came as bytes
        if reply.get("needed", 0) > outputs.memory.nbytes:
            await self._ensure(channel, "outputs", reply["needed"])  # next time they fit
        self.calls += 1
        return out, out_params

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            await self._release(channel.inputs)
            await self._release(channel.outputs)
        self._idle.clear()


def _interprocess_event(device: torch.device) -> torch.cuda.Event:
    with torch.cuda.device(device):
        event = torch.cuda.Event(interprocess=True)
        event.record()  # created now, so it has a handle
    return event
