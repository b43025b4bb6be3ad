"""Request and reply bodies on the aiohttp side: streamed in both directions, and a request larger than the
limit is rejected while it streams, before it is held in memory whole."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from aiohttp import web

from luna_stack.config import CoreSettings
from luna_stack.wire.codec import CONTENT_TYPE, decode, encode
from luna_stack.wire.errors import PayloadTooLarge, RequestTimeout
from luna_stack.wire.json_body import parse_object

_CHUNK = 1 << 20


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    idle_s: float  # longest pause between two parts of a body

    @classmethod
    def of(cls, core: CoreSettings) -> BodyLimits:
        return cls(int(core.max_body_mb * (1 << 20)), core.read_timeout_s)


async def read_body(request: web.Request, limits: BodyLimits) -> bytes:
    """Stream the request body into memory, failing as soon as it exceeds `max_bytes`, or when it pauses
    longer than `idle_s` (a body that declares 400 MiB and sends 10 bytes must not hold a connection)."""
    limit = limits.max_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"body of {declared} bytes exceeds max_body_mb={limit / (1 << 20):g} MiB",
            hint="raise max_body_mb (LUNA_MAX_BODY_MB) or send smaller batches",
        )
    buf = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.read(_CHUNK), timeout=limits.idle_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request body stalled for {limits.idle_s:g} s after {len(buf)} bytes",
                hint="read_timeout_s (LUNA_READ_TIMEOUT_S) bounds the pause between parts of a body",
            ) from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(
                f"body exceeds max_body_mb={limit / (1 << 20):g} MiB",
                hint="raise max_body_mb (LUNA_MAX_BODY_MB) or send less",
            )


async def read_tensors(
    request: web.Request, limits: BodyLimits
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if request.content_type == "application/json":
        # Parameter-only calls (no tensors) may send plain JSON.
        body = await read_body(request, limits)
        return {}, parse_object(body or b"{}", "the JSON body")
    return decode(await read_body(request, limits))


async def write_tensors(
    request: web.Request,
    tensors: Mapping[str, torch.Tensor],
    params: Mapping[str, Any] | None = None,
    status: int = 200,
) -> web.StreamResponse:
    blob = encode(tensors, params)
    resp = web.StreamResponse(status=status, headers={"Content-Type": CONTENT_TYPE})
    resp.content_length = len(blob)
    await resp.prepare(request)
    view = memoryview(blob)
    for start in range(0, len(view), _CHUNK):
        await resp.write(view[start : start + _CHUNK])
    await resp.write_eof()
    return resp
