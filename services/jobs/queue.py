"""Durable job queue on Redis Streams, one stream per service kind.

submit → XADD luna:jobs:<kind> (the request blob sits beside it in luna:job:<id>:in)
worker → XREADkeys.JOB_GROUP as a consumer of group "workers"; while a job runs the worker re-claims it every
         few seconds, so its idle time stays low; a replica that dies stops doing that, and after
         `claim_idle_ms` another replica takes the job over with XAUTOCLAIM. Nothing is lost.
result → luna:job:<id>:out with a TTL, state in the hash luna:job:<id>, a wake-up on luna:job:<id>:done.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from luna_stack.wire import keys
from luna_stack.wire.errors import JobTimeout, LunaError, UnknownJob, error_from_json

log = logging.getLogger(__name__)


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
        self.stream = keys.job_stream(kind)
        self.result_ttl_s = result_ttl_s
        self.claim_idle_ms = claim_idle_ms
        self.max_attempts = max_attempts

    @staticmethod
    def _key(job_id: str, suffix: str = "") -> str:
        return keys.job(job_id, suffix)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.JOB_GROUP, id="0", mkstream=True)
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
        reply = await self.redis.xreadgroup(
            keys.JOB_GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
        )
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
            self.stream,
            keys.JOB_GROUP,
            consumer,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=count,
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
            self.stream, keys.JOB_GROUP, consumer, min_idle_time=0, message_ids=[job.entry_id], justid=True
        )

    async def _ack(self, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, keys.JOB_GROUP, entry_id)
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
            pipe.xack(self.stream, keys.JOB_GROUP, job.entry_id)
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
            if g["name"] == keys.JOB_GROUP:
                lag = g.get("lag")
                pending = int(g.get("pending", 0))
                waiting = (
                    int(lag) if lag is not None else max(0, int(await self.redis.xlen(self.stream)) - pending)
                )
                return {"waiting": waiting, "running": pending}
        return {"waiting": 0, "running": 0}
