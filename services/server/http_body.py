"""Request and reply bodies on the aiohttp side: streamed in both directions, and a request larger than the
limit is rejected while it streams, before it is held in memory whole."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from aiohttp import web

from luna_stack.wire.codec import CONTENT_TYPE, decode, encode
from luna_stack.wire.errors import InvalidBody, PayloadTooLarge

_CHUNK = 1 << 20


async def read_body(request: web.Request, limit: int) -> bytes:
    """Stream the request body into memory, failing as soon as it exceeds `limit` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"body of {declared} bytes exceeds the limit of {limit} bytes",
            hint="raise server.max_body_mb or send smaller batches",
        )
    buf = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(
                f"body exceeds the limit of {limit} bytes", hint="raise server.max_body_mb or send less"
            )
    return bytes(buf)


async def read_tensors(request: web.Request, limit: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if request.content_type == "application/json":
        # Parameter-only calls (no tensors) may send plain JSON.
        body = await read_body(request, limit)
        try:
            params = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise InvalidBody(f"JSON body is invalid: {exc}") from None
        if not isinstance(params, dict):
            raise InvalidBody("JSON body must be an object")
        return {}, params
    return decode(await read_body(request, limit))


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
