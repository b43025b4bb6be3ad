"""Wire codec: tensors as one safetensors blob, parameters as JSON inside its `__metadata__`.

safetensors is a flat header + raw bytes: no code runs on load (unlike pickle), and encode/decode cost
one memcpy. No aiohttp here: the server streams bodies (server/http_body.py), the client posts them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from luna_stack.wire.contract import CONTENT_TYPE
from luna_stack.wire.errors import InvalidBody
from luna_stack.wire.json_body import parse_object

PARAMS_KEY = "luna"
# safetensors caps its JSON header at 100 MB; we accept far less: a header is names, shapes and params.
_MAX_HEADER = 16 << 20


def encode(tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any] | None = None) -> bytes:
    """Serialize CPU-or-GPU tensors (copied to CPU, made contiguous) and JSON params."""
    metadata = {PARAMS_KEY: json.dumps(dict(params or {}), separators=(",", ":"))}
    if not tensors:  # params only (every IPC request and reply): the header alone, without safetensors
        header = json.dumps({"__metadata__": metadata}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
        return struct.pack("<Q", len(header)) + header
    cpu: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (views of one tensor, one tensor twice).
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        cpu[name] = t
    return st_save(cpu, metadata=metadata)


def decode(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse a blob into (tensors, params). Anything malformed raises InvalidBody."""
    if len(blob) < 8:
        raise InvalidBody("body is not a safetensors blob: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > _MAX_HEADER or 8 + header_len > len(blob):
        raise InvalidBody(
            f"safetensors header claims {header_len} bytes but the body has {len(blob) - 8}",
            hint="the body was truncated or is not safetensors",
        )
    header = parse_object(blob[8 : 8 + header_len], "the safetensors header")
    if not set(header) - {"__metadata__"} and len(blob) == 8 + header_len:
        tensors: dict[str, torch.Tensor] = {}  # params only: nothing for safetensors to parse
    else:
        tensors = _load(blob)
    metadata = header.get("__metadata__") or {}
    raw = metadata.get(PARAMS_KEY, "{}") if isinstance(metadata, dict) else None
    if not isinstance(raw, str):
        raise InvalidBody(f'__metadata__["{PARAMS_KEY}"] must be a JSON string of the request parameters')
    return tensors, parse_object(raw, "the request parameters")


def _load(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError for every malformed case
        raise InvalidBody(f"malformed safetensors body: {exc}") from None


__all__ = ["CONTENT_TYPE", "PARAMS_KEY", "decode", "encode"]
