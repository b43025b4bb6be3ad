"""Conditioning cache in Redis, shared by every replica: a repeated prompt never reaches the GPU.

The key is the sha256 of everything the output depends on: the encoders' weights (content hash), the
compute dtype, the family (a Flux pair may also give SD3 conditioning), per-encoder token ids, T5's
included (textual-inversion vectors by their bytes' hash) and weights, the clip skip, and the LoRA stack
as (file content hash, strength). The value is the safetensors blob of (cond, pooled). Hits and misses
are counted per replica and, in Redis, across replicas.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import torch

from luna_stack.wire import keys
from luna_stack.wire.codec import decode, encode

from .tokenize import Chunk

log = logging.getLogger(__name__)
# Bump when the meaning of an entry changes (semantics or layout), so stale entries are never read.
_VERSION = "clip-cond-v2"


def _token_json(token: int | torch.Tensor) -> int | str:
    if isinstance(token, int):
        return token
    return "vec:" + hashlib.sha256(token.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def cache_key(
    model_id: str,
    dtype: str,
    chunks: dict[str, list[Chunk]],
    clip_skip: int | None,
    lora: tuple[tuple[str, float], ...],
    family: str = "",
) -> str:
    payload = {
        "v": _VERSION,
        "model": model_id,
        "family": family,
        "dtype": dtype,
        "tokens": {k: [[[_token_json(t), w] for t, w in c] for c in v] for k, v in sorted(chunks.items())},
        "clip_skip": clip_skip,
        "lora": [list(item) for item in lora],
    }
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0


class ConditioningCache:
    """Entries live under keys.cond_cache(digest), each with a TTL: besides expiring, that makes them the
    keys a `volatile-lru` Redis evicts first when it reaches maxmemory (job keys carry none)."""

    def __init__(self, redis: aioredis.Redis, ttl_s: int):
        self.redis = redis
        self.ttl_s = ttl_s
        self.stats = CacheStats()

    async def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            blob = await self.redis.get(keys.cond_cache(key))
        except aioredis.RedisError as exc:  # the cache is an optimisation: never fail a request for it
            self.stats.errors += 1
            log.warning("conditioning cache read failed: %s", exc)
            return None
        hit = blob is not None
        await self._count("hits" if hit else "misses")
        if not hit:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        tensors, _ = decode(blob)
        return tensors["cond"], tensors["pooled"]

    async def put(self, key: str, cond: torch.Tensor, pooled: torch.Tensor) -> None:
        try:
            blob = encode({"cond": cond, "pooled": pooled})
            await self.redis.set(keys.cond_cache(key), blob, ex=self.ttl_s)
            self.stats.stores += 1
        except aioredis.RedisError as exc:
            self.stats.errors += 1
            log.warning("conditioning cache write failed: %s", exc)

    async def _count(self, field: str) -> None:
        try:
            await self.redis.hincrby(keys.COND_CACHE_STATS, field, 1)
        except aioredis.RedisError:
            self.stats.errors += 1

    async def shared_stats(self) -> dict[str, Any]:
        """Counters of all replicas together."""
        raw = await self.redis.hgetall(keys.COND_CACHE_STATS)
        return {k.decode(): int(v) for k, v in raw.items()}
