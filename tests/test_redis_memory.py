"""Redis' memory budget: job keys never evictable and expired by the queue itself, a size cap for queued
bodies, a local Redis whose maxmemory evicts cache entries and never jobs, cache entries with TTLs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.clip.cache import ConditioningCache
from luna_stack.clip.settings import ClipSettings
from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.vae.family import build
from luna_stack.wire import keys
from luna_stack.wire.errors import JobTimeout, PayloadTooLarge, Unavailable, UnknownJob

from .conftest import make_settings

VAE = "vae/sd15-small-vae.safetensors"


async def test_job_keys_carry_no_ttl_and_the_queue_expires_them(redis_url: str) -> None:
    redis = connect(redis_url)
    queue = JobQueue(redis, "t", job_ttl_s=60, result_ttl_s=600)
    await queue.ensure_group()
    waiting = await queue.submit("op", b"never taken")
    finished = await queue.submit("op", b"taken")
    job = next(j for j in await queue.read("w", count=2, block_ms=100) if j.id == finished)
    await queue.complete(job, b"result")
    for key in (keys.job(waiting), keys.job(waiting, ":in"), keys.job(finished, ":out")):
        assert await redis.ttl(key) == -1  # persisted: a volatile-lru Redis can never evict it
    now = time.time()
    assert await queue.sweep(now + 30) == (0, 0)  # nothing is due yet

    assert await queue.sweep(now + 61) == (1, 0)  # the waiting job's time is up
    with pytest.raises(JobTimeout, match="job_ttl_s"):
        await queue.result(waiting, timeout_s=1)
    assert await redis.exists(keys.job(waiting, ":in")) == 0  # its input is gone
    assert await queue.result(finished, timeout_s=1) == b"result"  # results live result_ttl_s

    assert await queue.sweep(now + 61 + 601) == (0, 2)
    for job_id in (waiting, finished):
        with pytest.raises(UnknownJob):
            await queue.state(job_id)
        for suffix in ("", ":in", ":out", ":done"):
            assert await redis.exists(keys.job(job_id, suffix)) == 0
    assert await redis.zcard(keys.job_expiry("t")) == 0
    await redis.aclose()


async def test_an_expired_result_is_gone_on_read_before_any_sweep(redis_url: str) -> None:
    redis = connect(redis_url)
    queue = JobQueue(redis, "t", job_ttl_s=60)
    job_id = await queue.submit("op", b"x")
    await redis.zadd(keys.job_expiry("t"), {job_id: time.time() - 1})  # as if its hour had passed
    with pytest.raises(JobTimeout, match="expired"):
        await queue.result(job_id, timeout_s=1)
    await redis.aclose()


async def test_job_bodies_over_max_job_mb_get_413_naming_the_key(
    redis_url: str, models_dir: Path, start_service
) -> None:
    redis = connect(redis_url)
    queue = JobQueue(redis, "t", max_job_mb=0.01)
    with pytest.raises(PayloadTooLarge, match="max_job_mb") as err:
        await queue.submit("op", b"x" * 20_000)
    assert err.value.status == 413 and err.value.details["bytes"] == 20_000
    svc = start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_MAX_JOB_MB="0.05"))
    async with AsyncClient("vae", url=svc.url) as client:  # the HTTP jobs API
        with pytest.raises(PayloadTooLarge, match="max_job_mb") as err:
            await client.submit("decode", {"latent": torch.zeros(1, 4, 64, 64)}, {"model": VAE})
        assert "LUNA_MAX_JOB_MB" in (err.value.hint or "")
        small = await client.submit("decode", {"latent": torch.zeros(1, 4, 8, 8)}, {"model": VAE})
        out, _ = await client.wait(small, timeout_s=60)
    assert out["image"].shape == (1, 64, 64, 3)
    assert await redis.keys(f"{keys.PREFIX}job:*:in") == []  # the refused bodies never reached Redis
    await redis.aclose()


async def test_a_full_local_redis_evicts_cache_entries_never_queued_jobs(own_redis) -> None:
    """The local-mode configuration (maxmemory + volatile-lru): cache entries (TTL) make room, queued
    job inputs (no TTL) are all kept, and when only jobs are left a submit gets 503, not a lost job."""
    server = own_redis(maxmemory_mb=8)
    redis = connect(server.url)
    assert (await redis.config_get("maxmemory-policy"))["maxmemory-policy"] == "volatile-lru"
    queue = JobQueue(redis, "t")
    jobs = [await queue.submit("op", bytes([i]) * 200_000) for i in range(10)]  # 2 MB of queued jobs
    blob = b"c" * 100_000
    for i in range(200):  # 20 MB of cache entries through an 8 MB Redis
        await redis.set(keys.cond_cache(f"{i:064x}"), blob, ex=3600)
    info = await redis.info("stats")
    cached = len(await redis.keys(f"{keys.COND_CACHE_PREFIX}*"))
    assert info["evicted_keys"] > 0 and cached < 200
    for i, job_id in enumerate(jobs):
        assert await redis.get(keys.job(job_id, ":in")) == bytes([i]) * 200_000
    with pytest.raises(Unavailable, match="Redis is full"):
        for _ in range(100):  # 20 MB more of jobs: refused once the cache is gone
            jobs.append(await queue.submit("op", b"j" * 200_000))
    print(f"\nmaxmemory 8 MB: {info['evicted_keys']} cache entries evicted, {len(jobs)} queued jobs all kept")
    for job_id in jobs:
        assert await redis.exists(keys.job(job_id, ":in")) == 1
    await redis.aclose()


async def test_conditioning_cache_entries_expire_within_a_day(models_dir: Path, redis_url: str) -> None:
    ttl = make_settings(models_dir).of(ClipSettings).cache_ttl_s
    assert ttl == 86400  # was 7 days
    redis = connect(redis_url)
    cache = ConditioningCache(redis, ttl)
    await cache.put("ab" * 32, torch.zeros(1, 77, 8), torch.zeros(1, 8))
    (key,) = await redis.keys(f"{keys.COND_CACHE_PREFIX}*")
    assert key.decode() == keys.cond_cache("ab" * 32)
    assert 0 < await redis.ttl(key) <= ttl  # a TTL: expires, and is what volatile-lru may evict
    hit = await cache.get("ab" * 32)
    assert hit is not None and hit[0].shape == (1, 77, 8)
    assert await redis.ttl(keys.COND_CACHE_STATS) == -1  # the counters: tiny, kept
    await redis.aclose()
