"""A request's LoRA stack, as every layer passes it around once it is resolved for a model.

Clients send `"lora": [{"name": "x.safetensors", "strength": 0.8}, ...]` (parsed by request.py). Resolved,
a stack is one `LoraStack`: per part of the model (`unet`, or a text encoder's key `l` / `g`) the adapters
and their strengths in the request's order (what the side paths and the graph bank apply, see side.py's
`Stack`), and a `key` of (file content hash, strength) per entry — what an output depends on. Stacks
compare and hash by that key alone, so batches group rows by it and the conditioning cache keys on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from luna_stack.lora.cache import LoraCache
from luna_stack.lora.format import Component
from luna_stack.lora.side import Stack

StackKey = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraStack:
    key: StackKey = ()
    adapters: Mapping[str, Stack] = field(default_factory=dict, compare=False, hash=False)

    def part(self, name: str) -> Stack:
        """The adapters (with strengths) that act on one part of the model; () when none do."""
        return self.adapters.get(name, ())


NO_LORA = LoraStack()


async def stack_key(files: Sequence[tuple[Path, float]], cache: LoraCache) -> StackKey:
    """(file content hash, strength) per entry: hashing reads the file once, then size+mtime memoise it."""
    return tuple([(await asyncio.to_thread(cache.digest, path), s) for path, s in files])


async def resolve_stack(
    files: Sequence[tuple[Path, float]],
    cache: LoraCache,
    parts: Mapping[str, tuple[nn.Module, Component]],
    run: Callable[..., Awaitable[Any]],
    key: StackKey | None = None,
) -> LoraStack:
    """Bind every file to every part (model module tree and its LoRA component) through the cache;
    adapters with nothing for a part are left out of that part."""
    if not files:
        return NO_LORA
    adapters: dict[str, Stack] = {}
    for name, (module, component) in parts.items():
        resolved = [await cache.aresolve(path, module, component, run) for path, _ in files]
        adapters[name] = tuple((a, s) for a, (_, s) in zip(resolved, files, strict=True) if a.factors)
    return LoraStack(key if key is not None else await stack_key(files, cache), adapters)
