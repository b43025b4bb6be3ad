"""The queue's guarantee: at-least-once compute, exactly-once result, through Redis restarts, short claim
timeouts, read-ahead and duplicate computation; job keys never evictable, expired by the queue itself."""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.jobs.worker import QueueWorker
from luna_stack.vae.family import build
from luna_stack.wire import keys
from luna_stack.wire.errors import JobTimeout, UnknownJob

from .conftest import make_settings

VAE = "vae/sd15-small-vae.safetensors"


class LogEvent(logging.Handler):
    """Counts warnings containing `text` and sets an asyncio event at the first (when they are logged on
    the event loop's own thread)."""

    def __init__(self, text: str):
        super().__init__(logging.WARNING)
        self.text = text
        self.event = asyncio.Event()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1
            self.event.set()


async def _all_states(redis, job_ids: list[str]) -> list[dict[bytes, bytes]]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return await pipe.execute()


async def _stop(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_read_ahead_with_a_short_claim_timeout_computes_every_job_once(redis_url: str) -> None:
    """Two workers read up to 4 jobs beyond the 2 they run; a read-ahead job waits ~3 compute times
    (900 ms) for a slot, longer than the 600 ms claim timeout, and must still run only once. (At 300 ms,
    renewals every 100 ms, an event loop stalled by the rest of the suite on 2 cores lost claims.)"""
    redis = connect(redis_url)
    queue = JobQueue(redis, "t", claim_idle_ms=600)
    await queue.ensure_group()
    calls: collections.Counter[bytes] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()

    async def handler(op: str, payload: bytes) -> bytes:
        calls[payload] += 1
        await asyncio.sleep(0.3)  # the compute being simulated, not synchronisation
        return b"out-" + payload

    workers = [
        QueueWorker(
            JobQueue(redis, "t", claim_idle_ms=600),
            f"w{i}",
            handler,
            concurrency=2,
            read_ahead=4,
            on_outcome=lambda outcome: outcomes.update([outcome]),
        )
        for i in range(2)
    ]
    n = 32
    started = time.perf_counter()
    job_ids = [await queue.submit("op", str(i).encode()) for i in range(n)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        results = await asyncio.gather(*(queue.result(j, timeout_s=60) for j in job_ids))
    finally:
        await _stop(*tasks)
    elapsed = time.perf_counter() - started
    states = await _all_states(redis, job_ids)
    computed_twice = sum(1 for c in calls.values() if c > 1)
    print(
        f"\nread-ahead 4, claim timeout 600 ms, 2 workers x 2 slots: {n} jobs, {sum(calls.values())} "
        f"handler calls, {computed_twice} computed twice, {outcomes['duplicate']} duplicate results "
        f"dropped, {elapsed:.2f} s"
    )
    assert results == [b"out-" + str(i).encode() for i in range(n)]
    assert computed_twice == 0 and sum(calls.values()) == n
    assert [int(s[b"attempts"]) for s in states] == [1] * n
    assert [int(s[b"stored"]) for s in states] == [1] * n
    assert outcomes == {"done": n}
    assert await redis.xpending(keys.job_stream("t"), keys.JOB_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    await redis.aclose()


async def test_completion_is_idempotent_when_a_job_ran_twice(redis_url: str) -> None:
    redis = connect(redis_url)
    queue = JobQueue(redis, "t")
    await queue.ensure_group()
    job_id = await queue.submit("op", b"in")
    (first,) = await queue.read("a", count=1, block_ms=100)
    # b, with a claim timeout of 0, takes the job over as if a had stopped renewing it
    (second,) = await JobQueue(redis, "t", claim_idle_ms=0).reclaim("b", count=1)
    assert (first.id, second.id, first.attempt, second.attempt) == (job_id, job_id, 1, 2)
    assert await queue.renew("a", [first]) == [False]  # a learns that b holds it now
    assert await queue.complete(second, b"from b") == "done"
    assert await queue.complete(first, b"from a") == "duplicate"  # computed twice, stored once
    assert await queue.complete(second, b"from b") == "done"  # b's retry after a lost reply
    assert await queue.fail(first, JobTimeout("late")) == "duplicate"
    assert await queue.result(job_id, timeout_s=1) == b"from b"
    state = await queue.state(job_id)
    assert (state["state"], state["stored"], state["finished_by"]) == ("done", "1", "b#2")
    assert await redis.llen(keys.job(job_id, ":done")) == 1  # one wake-up: delivered once
    assert (await redis.xpending(keys.job_stream("t"), keys.JOB_GROUP))["pending"] == 0
    await redis.aclose()


async def test_a_result_finished_while_redis_is_down_is_stored_once_it_is_back(
    own_redis, tmp_path: Path
) -> None:
    server = own_redis(durable=True, fsync_always=True)
    redis = connect(server.url)
    queue = JobQueue(redis, "t", claim_idle_ms=5000)
    job_id = await queue.submit("op", b"in")
    started, release = asyncio.Event(), asyncio.Event()
    outcomes: list[str] = []

    async def handler(op: str, payload: bytes) -> bytes:
        started.set()
        await release.wait()
        return b"result"

    retrying = LogEvent(f"finishing job {job_id}")
    logging.getLogger("luna_stack.jobs.queue").addHandler(retrying)
    worker = QueueWorker(queue, "w", handler, on_outcome=outcomes.append)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        release.set()
        await asyncio.wait_for(retrying.event.wait(), 10)  # complete() met the dead connection
        assert outcomes == []  # ... and neither failed the job nor gave up
        own_redis(port=server.port, durable=True, fsync_always=True)
        assert await queue.result(job_id, timeout_s=30) == b"result"
        await asyncio.wait_for(_until(lambda: outcomes == ["done"]), 10)
    finally:
        logging.getLogger("luna_stack.jobs.queue").removeHandler(retrying)
        await _stop(task)
    state = await queue.state(job_id)
    assert (state["state"], state["stored"], state["attempts"]) == ("done", "1", "1")
    assert await redis.exists(keys.job(job_id, ":in")) == 0
    await redis.aclose()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_redis_sigkilled_and_restarted_under_load_loses_no_job(
    own_redis, models_dir: Path, start_service
) -> None:
    """80 queued VAE decodes on two real replicas; Redis (append-only, fsync always) is SIGKILLed when a
    quarter are done and restarted on its files: every job completes once, none fails."""
    server = own_redis(durable=True, fsync_always=True)
    settings = make_settings(
        models_dir, LUNA_REDIS_URL=server.url, LUNA_VAE_PRELOAD=VAE, LUNA_CLAIM_IDLE_MS="2000"
    )
    replicas = [start_service(build, settings) for _ in range(2)]
    redis = connect(server.url)
    retried = LogEvent("finishing job")  # a completion that met the dead Redis and was retried
    logging.getLogger("luna_stack.jobs.queue").addHandler(retried)
    n = 80
    started = time.perf_counter()
    async with AsyncClient("vae", redis_url=server.url) as client:
        job_ids = [await client.submit("decode", {"latent": _latent(i)}, {"model": VAE}) for i in range(n)]
        waits = [asyncio.create_task(client.wait(j, timeout_s=120)) for j in job_ids]
        await asyncio.wait_for(_until(lambda: sum(w.done() for w in waits) >= n // 4), 60)
        done_before = sum(w.done() for w in waits)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        killed = time.perf_counter()
        own_redis(port=server.port, durable=True, fsync_always=True)
        down_s = time.perf_counter() - killed
        outcomes = await asyncio.gather(*waits, return_exceptions=True)
    elapsed = time.perf_counter() - started
    logging.getLogger("luna_stack.jobs.queue").removeHandler(retried)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    states = await _all_states(redis, job_ids)
    lost = sum(1 for s in states if s.get(b"state") != b"done")
    stored_twice = sum(1 for s in states if int(s.get(b"stored", 0)) > 1)
    redelivered = sum(1 for s in states if int(s.get(b"attempts", 0)) > 1)
    dropped = sum(
        r.service.metrics.registry.get_sample_value("luna_jobs_total", {"outcome": "duplicate"}) or 0
        for r in replicas
    )
    print(
        f"\nredis SIGKILL + restart under load: {n} jobs ({done_before} done before the kill), "
        f"{len(failed)} failed, {lost} lost, {stored_twice} stored twice; {redelivered} delivered twice, "
        f"{dropped:.0f} duplicate results dropped, {retried.count} completion retries; redis down "
        f"{down_s:.2f} s, {elapsed:.1f} s in all"
    )
    assert failed == [] and lost == 0 and stored_twice == 0
    for i, (out, params) in enumerate(outcomes):
        assert out["image"].shape == (1, 128, 128, 3) and params["model"] == VAE, i
    await redis.aclose()


def _latent(seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))


async def test_a_job_id_naming_another_key_is_unknown_not_an_error(redis_url: str) -> None:
    redis = connect(redis_url)
    queue = JobQueue(redis, "t")
    job_id = await queue.submit("op", b"x")
    for bad in (f"{job_id}:done", f"{job_id}:in", "../x", "A" * 32, ""):
        with pytest.raises(UnknownJob, match="not a job id"):
            await queue.state(bad)
    assert (await queue.state(job_id))["state"] == "queued"
    await redis.aclose()
