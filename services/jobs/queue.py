"""Durable job queue on Redis Streams, one stream per service kind.

submit → one script: the request blob in luna:job:<id>:in, the state hash luna:job:<id>, an XADD to
         luna:jobs:<kind>, and the job's deadline in the expiry index luna:jobs:<kind>:expiry.
claim  → a worker reads entries as a consumer of group "workers" (XREADGROUP, or XAUTOCLAIM for entries
         another consumer held `claim_idle_ms` without renewing them) and claims each with a script
         that skips finished or expired jobs. While a worker holds a job (read ahead or running) it
         renews it, so no other replica takes it over; a replica that dies stops renewing.
finish → one script that stores the result (or error) only if the job is not finished yet, then XACKs:
         a job computed twice is stored and delivered once. Network errors on finishing are retried
         with backoff until Redis answers again; the result is never dropped.

Guarantee: at-least-once compute, exactly-once result (docs/design.md, "Queued jobs").

Job keys carry no Redis TTL (an eviction policy must never take a queued job): `sweep` deletes them
once their deadline in the expiry index has passed, and `state` treats a passed deadline as expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from luna_stack.wire import keys
from luna_stack.wire.errors import (
    JobTimeout,
    LunaError,
    PayloadTooLarge,
    Unavailable,
    UnknownJob,
    error_from_json,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# Errors after which the same command can be sent again: Redis restarting, a failover, a full Redis.
RETRYABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.05, 2.0
_SWEEP_BATCH = 200
_JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, what submit hands out

# Idempotent: a client library's retry after a lost reply must not queue the job a second time.
_SUBMIT = """
local known = redis.call('HGET', KEYS[2], 'entry')
if known then return known end
local entry = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1], 'op', ARGV[2])
redis.call('SET', KEYS[3], ARGV[6])
redis.call('HSET', KEYS[2], 'state', 'queued', 'op', ARGV[2], 'kind', ARGV[3], 'submitted', ARGV[4],
           'attempts', 0, 'entry', entry)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return entry
"""

# -> false (finished, expired or gone: acknowledge and skip) or {attempt, payload}
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return false end
local payload = redis.call('GET', KEYS[2])
if not payload then return false end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'claimed', ARGV[2])
redis.call('ZADD', KEYS[3], 'GT', ARGV[3], ARGV[4])
return {attempt, payload}
"""

# ARGV: group, consumer, deadline, then (entry id, job id) pairs -> 1 still ours (renewed), 0 not ours
_RENEW = """
local out = {}
for i = 4, #ARGV, 2 do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[i + 1])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# allow-oom: finishing frees the input, and a result must be storable even when Redis is full.
# -> 1 stored by this call or an earlier try of the same attempt, 0 already finished by another, -1 gone
_FINISH = """#!lua flags=allow-oom
local function ack()
  redis.call('XACK', KEYS[5], ARGV[6], ARGV[7])
  redis.call('XDEL', KEYS[5], ARGV[7])
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' or state == 'failed' then
  ack()
  if redis.call('HGET', KEYS[1], 'finished_by') == ARGV[2] then return 1 end
  return 0
end
if not state then
  ack()
  return -1
end
redis.call('DEL', KEYS[2])
if ARGV[1] == 'done' then redis.call('SET', KEYS[3], ARGV[9]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished', ARGV[3], 'finished_by', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('HINCRBY', KEYS[1], 'stored', 1)
redis.call('RPUSH', KEYS[4], 1)
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[8])
ack()
return 1
"""

# ARGV: now, result deadline, job key prefix, error JSON, group, then job ids (each re-checked here)
# -> {expired (failed now), removed (keys deleted)}
_EXPIRE = """#!lua flags=allow-oom
local expired, removed = 0, 0
for i = 6, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= tonumber(ARGV[1]) then
    local h = ARGV[3] .. id
    local state = redis.call('HGET', h, 'state')
    if state == 'queued' or state == 'running' then
      redis.call('HSET', h, 'state', 'failed', 'finished', ARGV[1], 'error', ARGV[4])
      redis.call('DEL', h .. ':in')
      redis.call('RPUSH', h .. ':done', 1)
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      local entry = redis.call('HGET', h, 'entry')
      if entry then
        redis.call('XACK', KEYS[2], ARGV[5], entry)
        redis.call('XDEL', KEYS[2], entry)
      end
      expired = expired + 1
    else
      redis.call('DEL', h, h .. ':in', h .. ':out', h .. ':done')
      redis.call('ZREM', KEYS[1], id)
      removed = removed + 1
    end
  end
end
return {expired, removed}
"""


@dataclass(frozen=True)
class Job:
    id: str
    op: str
    entry_id: bytes
    payload: bytes
    attempt: int
    consumer: str  # who claimed it: completion is recorded as `<consumer>#<attempt>`

    @property
    def token(self) -> str:
        return f"{self.consumer}#{self.attempt}"


async def retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """`await call()` until Redis answers: connection drops, restarts (LOADING), failovers and a full
    Redis are waited out with exponential backoff; other errors propagate."""
    delay = _BACKOFF_FIRST_S
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            log.warning("%s: %s: %s; retrying in %.2f s", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


class JobQueue:
    def __init__(
        self,
        redis: aioredis.Redis,
        kind: str,
        *,
        result_ttl_s: int = 3600,
        job_ttl_s: int = 3600,
        claim_idle_ms: int = 30000,
        max_attempts: int = 3,
        max_job_mb: float = 128.0,
    ):
        self.redis = redis
        self.kind = kind
        self.stream = keys.job_stream(kind)
        self.expiry = keys.job_expiry(kind)
        self.result_ttl_s = result_ttl_s
        self.job_ttl_s = job_ttl_s
        self.claim_idle_ms = claim_idle_ms
        self.max_attempts = max_attempts
        self.max_job_bytes = int(max_job_mb * (1 << 20))
        self._submit = redis.register_script(_SUBMIT)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._finish_script = redis.register_script(_FINISH)
        self._expire = redis.register_script(_EXPIRE)

    @staticmethod
    def _key(job_id: str, suffix: str = "") -> str:
        return keys.job(job_id, suffix)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.JOB_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists already: fine
                raise

    def check_size(self, nbytes: int | None) -> None:
        """Refuse a job body over `max_job_mb` (before it is read, when its length is declared)."""
        if nbytes is not None and nbytes > self.max_job_bytes:
            raise PayloadTooLarge(
                f"job body of {nbytes} bytes exceeds max_job_mb ({self.max_job_bytes / (1 << 20):g} MiB)",
                hint="raise max_job_mb (LUNA_MAX_JOB_MB), send fewer rows per job, "
                "or call POST /v1/<kind>/<op> synchronously",
                details={"bytes": nbytes, "max_job_mb": self.max_job_bytes / (1 << 20)},
            )

    async def submit(self, op: str, payload: bytes) -> str:
        self.check_size(len(payload))
        job_id = uuid.uuid4().hex
        now = time.time()
        job_keys = [self.stream, self._key(job_id), self._key(job_id, ":in"), self.expiry]
        args = [job_id, op, self.kind, now, now + self.job_ttl_s, payload]
        try:
            await self._submit(keys=job_keys, args=args)
        except OutOfMemoryError:
            raise Unavailable(
                "Redis is full: it holds as many queued jobs and results as its maxmemory allows",
                hint="wait for queued jobs to finish, raise Redis' maxmemory (local mode: "
                "local_redis_maxmemory_mb), or lower result_ttl_s",
            ) from None
        with contextlib.suppress(RedisError):  # housekeeping: keeps memory bounded where no worker runs
            await self.sweep(now)
        return job_id

    async def _load(self, consumer: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Job | None:
        job_id = fields[b"job"].decode()
        keys_ = [self._key(job_id), self._key(job_id, ":in"), self.expiry]
        claimed = await self._claim(keys=keys_, args=[consumer, time.time(), self._deadline(), job_id])
        if claimed is None:
            # Finished by a replica that died before XACK, or expired: nothing left to do.
            await self._ack(entry_id)
            return None
        attempt, payload = claimed
        return Job(job_id, fields[b"op"].decode(), entry_id, payload, int(attempt), consumer)

    def _deadline(self) -> float:
        return time.time() + self.job_ttl_s

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

    async def reclaim(
        self, consumer: str, *, count: int = 10, held: frozenset[bytes] = frozenset()
    ) -> list[Job]:
        """Take over jobs that a consumer has held for claim_idle_ms without renewing them.

        Entries in `held` (this consumer's own jobs, e.g. while Redis was away and renewals failed) are
        only re-claimed, never handed out a second time."""
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
            if not fields or entry_id in held:
                continue
            job = await self._load(consumer, entry_id, fields)
            if job is None:
                continue
            log.warning("job %s reclaimed by %s (attempt %d)", job.id, consumer, job.attempt)
            jobs.append(job)
        return jobs

    async def renew(self, consumer: str, jobs: list[Job]) -> list[bool]:
        """Reset the idle time of the jobs this consumer holds (read ahead or running), so no other
        replica takes them over, and push their deadlines on. False: the job is no longer this
        consumer's (another replica took it over, or it finished)."""
        if not jobs:
            return []
        args: list[object] = [keys.JOB_GROUP, consumer, self._deadline()]
        for job in jobs:
            args += [job.entry_id, job.id]
        flags = await self._renew(keys=[self.stream, self.expiry], args=args)
        return [bool(flag) for flag in flags]

    async def _ack(self, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, keys.JOB_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _finish(self, job: Job, state: str, *, result: bytes | None, error: dict | None) -> str:
        """Record the outcome once, retrying through Redis outages. Returns 'done' / 'failed' when this
        attempt's outcome was stored, 'duplicate' when the job had been finished already (the result
        of another attempt stands), 'expired' when the job's keys are gone."""
        job_keys = [
            self._key(job.id),
            self._key(job.id, ":in"),
            self._key(job.id, ":out"),
            self._key(job.id, ":done"),
            self.stream,
            self.expiry,
        ]
        args = [
            state,
            job.token,
            time.time(),
            json.dumps(error) if error is not None else "",
            time.time() + self.result_ttl_s,
            keys.JOB_GROUP,
            job.entry_id,
            job.id,
            result if result is not None else b"",
        ]
        stored = await retrying(
            f"finishing job {job.id}", lambda: self._finish_script(keys=job_keys, args=args)
        )
        if stored == 1:
            return state
        if stored == 0:
            log.info("job %s: finished already by another attempt; this result is dropped", job.id)
            return "duplicate"
        log.warning("job %s expired before %s finished it", job.id, job.token)
        return "expired"

    async def complete(self, job: Job, result: bytes) -> str:
        return await self._finish(job, "done", result=result, error=None)

    async def fail(self, job: Job, error: LunaError) -> str:
        return await self._finish(
            job, "failed", result=None, error={"status": error.status, **error.to_json()}
        )

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Fail jobs whose deadline passed unfinished and delete the keys of finished jobs whose result
        time is up. Returns (expired, removed)."""
        now = time.time() if now is None else now
        error = JobTimeout(
            f"job expired: no replica finished it within job_ttl_s ({self.job_ttl_s} s)",
            hint="start a replica of this kind, or raise job_ttl_s (LUNA_JOB_TTL_S)",
        )
        error_json = json.dumps({"status": error.status, **error.to_json()})
        expired = removed = 0
        while True:
            due = await self.redis.zrangebyscore(self.expiry, "-inf", now, start=0, num=_SWEEP_BATCH)
            if not due:
                break
            args = [now, now + self.result_ttl_s, keys.job(""), error_json, keys.JOB_GROUP, *due]
            counts = await self._expire(keys=[self.expiry, self.stream], args=args)
            expired, removed = expired + int(counts[0]), removed + int(counts[1])
            if len(due) < _SWEEP_BATCH:
                break
        return expired, removed

    async def state(self, job_id: str) -> dict[str, str]:
        if not _JOB_ID.fullmatch(job_id):  # e.g. '<id>:done' would name another key of the job
            raise UnknownJob(f"{job_id[:80]!r} is not a job id", hint="job ids are 32 hex digits")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key(job_id))
            pipe.zscore(self.expiry, job_id)
            raw, deadline = await pipe.execute()
        if raw and deadline is not None and deadline <= time.time():
            await self.sweep()
            raw = await self.redis.hgetall(self._key(job_id))
        if not raw:
            raise UnknownJob(
                f"job {job_id} is unknown or its result expired",
                hint=f"results are kept for {self.result_ttl_s} s",
            )
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def result(self, job_id: str, *, timeout_s: float = 300.0) -> bytes:
        """Wait for a job and return its result blob; a failed job raises the error it failed with.
        A Redis restart meanwhile is waited out (until the timeout)."""
        deadline = time.monotonic() + timeout_s
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                return await self._result_once(job_id, deadline, timeout_s)
            except RETRYABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"Redis unreachable while waiting for job {job_id}: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _result_once(self, job_id: str, deadline: float, timeout_s: float) -> bytes:
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
