"""LoraCache: content-hash keying, hit/miss counting, LRU eviction by bytes, Redis metadata (real redis)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
import redis.asyncio
import torch

from luna_stack.devtools.lora_fixtures import tiny_clip, write_lora
from luna_stack.lora import LoraCache
from luna_stack.wire.errors import ModelLoadError, NotFound


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture
def files(clip, tmp_path) -> list[Path]:
    """Three different adapters of equal size (same targets and rank, different seeds)."""
    paths = []
    for seed in range(3):
        path = tmp_path / f"lora{seed}.safetensors"
        write_lora(path, clip, "clip_l", fmt="kohya", targets="all", seed=seed)
        paths.append(path)
    return paths


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hits_misses_and_content_hash_keying(files, tmp_path):
    cache = LoraCache(1 << 30, "cpu", torch.float32)
    first = cache.get(files[0])
    assert cache.get(files[0]) is first
    copy = tmp_path / "renamed.safetensors"
    shutil.copyfile(files[0], copy)
    assert cache.get(copy) is first  # same bytes under another name: the same entry
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.entries, stats.bytes) == (1, 2, 1, first.nbytes)
    assert _digest(files[0]) in cache

    # New content under a known name is a new entry (size or mtime changed, so the hash is recomputed).
    write_lora(copy, tiny_clip(), "clip_l", fmt="peft", seed=9)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    other = cache.get(copy)
    assert other is not first and other.format == "peft"
    assert cache.stats().misses == 2 and cache.stats().entries == 2


def test_lru_eviction_by_bytes(files):
    size = LoraCache(1 << 30, "cpu", torch.float32).get(files[0]).nbytes
    cache = LoraCache(int(2.5 * size), "cpu", torch.float32)
    a, b, c = (_digest(p) for p in files)
    cache.get(files[0])
    cache.get(files[1])
    cache.get(files[0])  # a is now the most recently used
    cache.get(files[2])  # needs room: evicts b
    assert a in cache and c in cache and b not in cache
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (1, 2, 2 * size)
    cache.get(files[1])  # a miss again, evicting a (least recently used now)
    assert a not in cache and (stats := cache.stats()).misses == 4 and stats.evictions == 2

    small = LoraCache(size // 2, "cpu", torch.float32)  # an adapter larger than the cache still loads, alone
    small.get(files[0])
    small.get(files[1])
    assert small.stats().entries == 1 and small.stats().evictions == 1


def test_entries_live_on_the_cache_device_and_dtype(files, clip):
    cache = LoraCache(1 << 30, "cpu", torch.float16)
    lora = cache.get(files[0])
    assert {t.factors.down.dtype for t in lora.targets} == {torch.float16}
    assert lora.nbytes == sum(t.factors.down.numel() + t.factors.up.numel() for t in lora.targets) * 2
    half_clip = tiny_clip().half()
    resolved = cache.resolve(files[0], half_clip, "clip_l")
    assert resolved is cache.resolve(files[0], half_clip, "clip_l")  # memoised with the entry
    f = next(iter(resolved.factors.values()))
    cached_ptrs = {t.factors.down.data_ptr() for t in lora.targets}
    assert f.down.dtype == torch.float16 and f.down.data_ptr() in cached_ptrs  # a view, not a copy


def test_resolve_memo_is_dropped_with_its_entry(files, clip):
    size = LoraCache(1 << 30, "cpu", torch.float32).get(files[0]).nbytes
    cache = LoraCache(size, "cpu", torch.float32)
    first = cache.resolve(files[0], clip, "clip_l")
    cache.get(files[1])  # evicts files[0]
    again = cache.resolve(files[0], clip, "clip_l")
    assert again is not first and set(again.factors) == set(first.factors)


def test_missing_and_corrupt_files(tmp_path):
    cache = LoraCache(1 << 30, "cpu", torch.float32)
    with pytest.raises(NotFound, match="LoRA file not found"):
        cache.get(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ModelLoadError, match=r"bad\.safetensors is not a readable safetensors file"):
        cache.get(bad)
    assert cache.stats().entries == 0


async def test_redis_metadata(files, clip, redis_url):
    client = redis.asyncio.Redis.from_url(redis_url)
    size = LoraCache(1 << 30, "cpu", torch.float32).get(files[0]).nbytes
    cache = LoraCache(int(1.5 * size), "cpu", torch.float32, redis=client, replica="r1")
    a, b = _digest(files[0]), _digest(files[1])
    try:
        await cache.aresolve(files[0], clip, "clip_l")
        await cache.aresolve(files[0], clip, "clip_l")
        lora = cache.get(files[0])
        meta = await client.hgetall(f"luna:lora:meta:{a}")
        assert meta == {
            b"file": str(files[0]).encode(),
            b"size": str(files[0].stat().st_size).encode(),
            b"rank": b"4",
            b"format": b"kohya",
            b"components": b"clip_l",
            b"targets": str(len(lora.targets)).encode(),
        }
        assert await client.zrange("luna:lora:replica:r1:lru", 0, -1) == [a.encode()]

        async def run(fn, *args):  # stands in for GpuExecutor.run: the load happens wherever it says
            return fn(*args)

        await cache.aresolve(files[1], clip, "clip_l", run)  # evicts a
        assert await client.zrange("luna:lora:replica:r1:lru", 0, -1) == [b.encode()]
        for key in ("luna:lora:replica:r1:stats", "luna:lora:stats"):
            assert await client.hgetall(key) == {b"hits": b"1", b"misses": b"2", b"evictions": b"1"}
        await cache.aresolve(files[1], clip, "clip_l")
        score = await client.zscore("luna:lora:replica:r1:lru", b)
        assert abs(score - time.time()) < 5
        for key in ("luna:lora:replica:r1:lru", "luna:lora:replica:r1:stats"):  # a dead replica's keys go
            assert 0 < await client.ttl(key) <= 24 * 3600
    finally:
        await client.aclose()


async def test_without_redis_aresolve_is_resolve(files, clip):
    cache = LoraCache(1 << 30, "cpu", torch.float32)
    assert await cache.aresolve(files[0], clip, "clip_l") is cache.resolve(files[0], clip, "clip_l")
    assert cache.stats().hits == 1 and cache.stats().misses == 1
