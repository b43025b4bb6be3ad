"""Durable job queue on Redis Streams, one stream per service kind.

submit → XADD luna:jobs:<kind> (the request blob sits beside it in luna:job:<id>:in)
worker → XREADGROUP as a consumer of group "workers"; while a job runs the worker re-claims it every
         few seconds, so its idle time stays low; a replica that dies stops doing that, and after
         `claim_idle_ms` another replica takes the job over with XAUTOCLAIM. Nothing is lost.
result → luna:job:<id>:out with a TTL, state in the hash luna:job:<id>, a wake-up on luna:job:<id>:done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .errors import JobFailed, JobTimeout, LunaError, UnknownJob, error_from_json

log = logging.getLogger(__name__)
GROUP = b"workers"


def connect(url: str, *, block_ms: int = 2000) -> aioredis.Redis:
    # socket_timeout must outlast the longest blocking command (XREADGROUP BLOCK, BLPOP).
    return aioredis.Redis.from_url(
        url, decode_responses=False, socket_timeout=block_ms / 1000 + 10, health_check_interval=30
    )


@dataclass(frozen=True)
class Job:
    id: str
    op: str
    entry_id: bytes
    payload: bytes
    attempt: int


class JobQueue:
    def __init__(
        self,
        redis: aioredis.Redis,
        kind: str,
        *,
        result_ttl_s: int = 3600,
        claim_idle_ms: int = 30000,
        max_attempts: int = 3,
    ):
        self.redis = redis
        self.kind = kind
        self.stream = f"luna:jobs:{kind}".encode()
        self.result_ttl_s = result_ttl_s
        self.claim_idle_ms = claim_idle_ms
        self.max_attempts = max_attempts

    @staticmethod
    def _key(job_id: str, suffix: str = "") -> str:
        return f"luna:job:{job_id}{suffix}"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists already: fine
                raise

    async def submit(self, op: str, payload: bytes) -> str:
        job_id = uuid.uuid4().hex
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(job_id, ":in"), payload, ex=self.result_ttl_s)
            pipe.hset(
                self._key(job_id),
                mapping={
                    "state": "queued",
                    "op": op,
                    "kind": self.kind,
                    "submitted": time.time(),
                    "attempts": 0,
                },
            )
            pipe.expire(self._key(job_id), self.result_ttl_s)
            pipe.xadd(self.stream, {"job": job_id, "op": op})
            await pipe.execute()
        return job_id

    async def _load(self, consumer: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Job | None:
        job_id = fields[b"job"].decode()
        state = await self.redis.hget(self._key(job_id), "state")
        payload = await self.redis.get(self._key(job_id, ":in"))
        if state in (b"done", b"failed") or payload is None:
            # Finished by a replica that died before XACK, or expired: nothing left to do.
            await self._ack(entry_id)
            return None
        attempt = int(await self.redis.hincrby(self._key(job_id), "attempts", 1))
        await self.redis.hset(self._key(job_id), mapping={"state": "running", "worker": consumer})
        return Job(job_id, fields[b"op"].decode(), entry_id, payload, attempt)

    async def read(self, consumer: str, *, count: int = 1, block_ms: int = 2000) -> list[Job]:
        reply = await self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms)
        jobs = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                job = await self._load(consumer, entry_id, fields)
                if job is not None:
                    jobs.append(job)
        return jobs

    async def reclaim(self, consumer: str, *, count: int = 10) -> list[Job]:
        """Take over jobs that another consumer has held for claim_idle_ms without renewing them."""
        _next, entries, _deleted = await self.redis.xautoclaim(
            self.stream, GROUP, consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=count
        )
        jobs = []
        for entry_id, fields in entries:
            if not fields:
                continue
            job = await self._load(consumer, entry_id, fields)
            if job is None:
                continue
            log.warning("job %s reclaimed by %s (attempt %d)", job.id, consumer, job.attempt)
            jobs.append(job)
        return jobs

    async def renew(self, consumer: str, job: Job) -> None:
        """Reset a running job's idle time so no other replica takes it over."""
        await self.redis.xclaim(
            self.stream, GROUP, consumer, min_idle_time=0, message_ids=[job.entry_id], justid=True
        )

    async def _ack(self, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _finish(self, job: Job, state: str, *, result: bytes | None, error: dict | None) -> None:
        ttl = self.result_ttl_s
        async with self.redis.pipeline(transaction=True) as pipe:
            if result is not None:
                pipe.set(self._key(job.id, ":out"), result, ex=ttl)
            mapping = {"state": state, "finished": time.time()}
            if error is not None:
                mapping["error"] = json.dumps(error)
            pipe.hset(self._key(job.id), mapping=mapping)
            pipe.expire(self._key(job.id), ttl)
            pipe.delete(self._key(job.id, ":in"))
            pipe.rpush(self._key(job.id, ":done"), b"1")
            pipe.expire(self._key(job.id, ":done"), ttl)
            pipe.xack(self.stream, GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    async def complete(self, job: Job, result: bytes) -> None:
        await self._finish(job, "done", result=result, error=None)

    async def fail(self, job: Job, error: LunaError) -> None:
        await self._finish(job, "failed", result=None, error={"status": error.status, **error.to_json()})

    async def state(self, job_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self._key(job_id))
        if not raw:
            raise UnknownJob(
                f"job {job_id} is unknown or its result expired",
                hint=f"results are kept for {self.result_ttl_s} s",
            )
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def result(self, job_id: str, *, timeout_s: float = 300.0) -> bytes:
        """Wait for a job and return its result blob; a failed job raises the error it failed with."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.state(job_id)
            if info["state"] == "done":
                blob = await self.redis.get(self._key(job_id, ":out"))
                if blob is None:
                    raise UnknownJob(f"job {job_id}'s result expired")
                return blob
            if info["state"] == "failed":
                payload = json.loads(info.get("error", "{}"))
                raise error_from_json(int(payload.pop("status", 500)), payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeout(f"job {job_id} not finished after {timeout_s:.0f} s (state {info['state']})")
            await self.redis.blpop([self._key(job_id, ":done")], timeout=max(0.05, min(remaining, 1.0)))

    async def depth(self) -> dict[str, int]:
        """Jobs waiting to be read and jobs being worked on."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return {"waiting": 0, "running": 0}
        for g in groups:
            if g["name"] == GROUP:
                lag = g.get("lag")
                pending = int(g.get("pending", 0))
                waiting = (
                    int(lag) if lag is not None else max(0, int(await self.redis.xlen(self.stream)) - pending)
                )
                return {"waiting": waiting, "running": pending}
        return {"waiting": 0, "running": 0}


Handler = Callable[[str, bytes], Awaitable[bytes]]


class QueueWorker:
    """Consumes a kind's stream inside a service replica and runs jobs through `handler`.

    Up to `concurrency` jobs run at once so queued jobs can meet in the service's batcher.
    """

    def __init__(
        self,
        queue: JobQueue,
        consumer: str,
        handler: Handler,
        *,
        concurrency: int = 4,
        on_outcome: Callable[[str], None] | None = None,
    ):
        self.queue = queue
        self.consumer = consumer
        self.handler = handler
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_outcome = on_outcome or (lambda outcome: None)

    async def run(self) -> None:
        await self.queue.ensure_group()
        last_reclaim = 0.0
        while True:
            try:
                await self._slots.acquire()
                self._slots.release()
                now = time.monotonic()
                jobs: list[Job] = []
                if now - last_reclaim > self.queue.claim_idle_ms / 2000:
                    jobs = await self.queue.reclaim(self.consumer, count=self.concurrency)
                    last_reclaim = now
                if not jobs:
                    jobs = await self.queue.read(self.consumer, count=self.concurrency, block_ms=1000)
                for job in jobs:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._run_one(job))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: keep trying, jobs are safe in the stream
                log.error("queue worker %s: %s; retrying in 1 s", self.consumer, exc)
                await asyncio.sleep(1.0)

    async def _keep_claimed(self, job: Job) -> None:
        period = max(0.05, self.queue.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await self.queue.renew(self.consumer, job)

    async def _run_one(self, job: Job) -> None:
        renewer = asyncio.create_task(self._keep_claimed(job))
        try:
            if job.attempt > self.queue.max_attempts:
                raise JobFailed(
                    f"job {job.id} gave up after {job.attempt - 1} attempts",
                    hint="the replicas that took it died while running it",
                )
            result = await self.handler(job.op, job.payload)
            await self.queue.complete(job, result)
            self._on_outcome("done")
        except LunaError as exc:
            await self.queue.fail(job, exc)
            self._on_outcome("failed")
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self.queue.fail(job, JobFailed(f"job {job.id} failed: {exc}"))
            self._on_outcome("failed")
        finally:
            renewer.cancel()
            self._slots.release()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
