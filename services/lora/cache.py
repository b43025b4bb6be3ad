"""Device-resident LRU of LoRA adapters keyed by file content, with optional metadata in Redis.

Entries are keyed by the sha256 of the file's bytes, so one file under two names (or a renamed file) is
one entry, and an edited file under the same name is a new one. A path's hash is remembered against its
size and mtime so a hit does not re-read a large file. Files are read as safetensors only.

Redis (optional, a redis.asyncio client; keys under `luna:lora:`):
  meta:<hash>             hash  file, size, rank, format, components, targets
  replica:<id>:lru        zset  hashes resident on this replica, score = last use (unix seconds)
  replica:<id>:stats      hash  hits, misses, evictions of this replica
  stats                   hash  hits, misses, evictions of all replicas
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from luna_stack.lora.format import Component, LoraFile, load_lora_bytes
from luna_stack.lora.resolve import ResolvedLora, resolve
from luna_stack.wire import keys
from luna_stack.wire.errors import ModelLoadError, NotFound


@dataclass
class LoraCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    capacity_bytes: int = 0


@dataclass
class _Entry:
    lora: LoraFile
    # (id(model), component) -> adapter; an entry's ResolvedLora checks the model itself (ids are reused)
    resolved: dict[tuple[int, Component], ResolvedLora] = field(default_factory=dict)


@dataclass(frozen=True)
class _Lookup:
    digest: str
    lora: LoraFile
    hit: bool
    path: str
    size: int  # bytes of the file; 0 on a hit (not re-read)
    evicted: tuple[str, ...]


class LoraCache:
    def __init__(
        self,
        capacity_bytes: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        redis: Any = None,
        replica: str | None = None,
        key_prefix: str = keys.LORA_PREFIX,
    ):
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.dtype = dtype
        self.redis = redis
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.key_prefix = key_prefix
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._hash_of_path: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)
        self._stats = LoraCacheStats(capacity_bytes=capacity_bytes)
        self._lock = threading.RLock()

    def get(self, path: str | os.PathLike[str]) -> LoraFile:
        """The adapter in `path`, on the cache's device and dtype (loaded on a miss)."""
        return self._lookup(path).lora

    def resolve(self, path: str | os.PathLike[str], model: nn.Module, component: Component) -> ResolvedLora:
        """`lora_resolve.resolve` of the cached file, memoised with the entry (dropped on eviction)."""
        with self._lock:
            return self._bind(self._lookup(path), model, component)

    async def aresolve(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        component: Component,
        run: Callable[..., Awaitable[Any]] | None = None,
    ) -> ResolvedLora:
        """`resolve` through `run` (e.g. GpuExecutor.run), then recorded in Redis: one lookup, one count."""

        def lookup_and_bind() -> tuple[_Lookup, ResolvedLora]:
            with self._lock:
                found = self._lookup(path)
                return found, self._bind(found, model, component)

        found, resolved = await run(lookup_and_bind) if run else lookup_and_bind()
        if self.redis is not None:
            await self._publish(found)
        return resolved

    def digest(self, path: str | os.PathLike[str]) -> str:
        """The file's sha256 (what identifies an adapter), remembered against its size and mtime."""
        with self._lock:
            return self._digest(os.fspath(path))[0]

    def _bind(self, found: _Lookup, model: nn.Module, component: Component) -> ResolvedLora:
        with self._lock:
            entry = self._entries.get(found.digest)
            key = (id(model), component)
            cached = entry.resolved.get(key) if entry else None
            if cached is not None and cached.belongs_to(model):
                return cached
            resolved = resolve(found.lora, model, component, dtype=self.dtype)
            if entry is not None:
                entry.resolved[key] = resolved
            return resolved

    def stats(self) -> LoraCacheStats:
        with self._lock:
            return LoraCacheStats(**vars(self._stats))

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def _lookup(self, path: str | os.PathLike[str]) -> _Lookup:
        path = os.fspath(path)
        with self._lock:
            digest, data = self._digest(path)
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
                self._stats.hits += 1
                return _Lookup(digest, entry.lora, True, path, 0, ())
            if data is None:
                data = _read(path)
            lora = load_lora_bytes(data, Path(path).name).to(self.device, self.dtype)
            evicted = self._make_room(lora.nbytes)
            self._entries[digest] = _Entry(lora)
            self._stats.misses += 1
            self._stats.bytes += lora.nbytes
            self._stats.entries = len(self._entries)
            return _Lookup(digest, lora, False, path, len(data), evicted)

    def _digest(self, path: str) -> tuple[str, bytes | None]:
        """(sha256, the bytes when they had to be read); unchanged size+mtime reuse the last hash."""
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            raise NotFound(f"LoRA file not found: {Path(path).name}") from exc
        known = self._hash_of_path.get(path)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2], None
        data = _read(path)
        digest = hashlib.sha256(data).hexdigest()
        self._hash_of_path[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest, data

    def _make_room(self, nbytes: int) -> tuple[str, ...]:
        """Evict least recently used entries until `nbytes` fit (an adapter larger than the cache still
        loads: it then stays alone)."""
        evicted = []
        while self._entries and self._stats.bytes + nbytes > self.capacity_bytes:
            digest, entry = self._entries.popitem(last=False)
            self._stats.bytes -= entry.lora.nbytes
            self._stats.evictions += 1
            evicted.append(digest)
        return tuple(evicted)

    async def _publish(self, found: _Lookup) -> None:
        p = self.key_prefix
        replica_lru, replica_stats = f"{p}replica:{self.replica}:lru", f"{p}replica:{self.replica}:stats"
        pipe = self.redis.pipeline(transaction=False)
        if not found.hit:
            lora = found.lora
            pipe.hset(
                f"{p}meta:{found.digest}",
                mapping={
                    "file": found.path,
                    "size": found.size,
                    "rank": lora.rank,
                    "format": lora.format,
                    "components": ",".join(lora.components),
                    "targets": len(lora.targets),
                },
            )
        if found.evicted:
            pipe.zrem(replica_lru, *found.evicted)
        pipe.zadd(replica_lru, {found.digest: time.time()})
        counter = "hits" if found.hit else "misses"
        for key in (replica_stats, f"{p}stats"):
            pipe.hincrby(key, counter, 1)
            if found.evicted:
                pipe.hincrby(key, "evictions", len(found.evicted))
        # A replica that stops (or dies) leaves no lasting trace: its keys expire a day after last use.
        pipe.expire(replica_lru, _REPLICA_KEY_TTL_S)
        pipe.expire(replica_stats, _REPLICA_KEY_TTL_S)
        await pipe.execute()


_REPLICA_KEY_TTL_S = 24 * 3600


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"LoRA file not found: {Path(path).name}") from exc
    except OSError as exc:
        raise ModelLoadError(f"LoRA file {Path(path).name} cannot be read: {exc.strerror}") from exc
