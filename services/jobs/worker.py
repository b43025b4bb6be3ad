"""The consuming side of a kind's job queue, inside a service replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from luna_stack.jobs.queue import Job, JobQueue
from luna_stack.wire.errors import JobFailed, LunaError

log = logging.getLogger(__name__)


Handler = Callable[[str, bytes], Awaitable[bytes]]


class QueueWorker:
    """Consumes a kind's stream inside a service replica and runs jobs through `handler`.

    Up to `concurrency` jobs run at once so queued jobs can meet in the service's batcher; up to
    `read_ahead` more are read and wait for a free slot. Every job the worker holds, running or waiting,
    is renewed in Redis every claim_idle_ms / 3, so a short claim timeout never hands a job this replica
    has read to another consumer, nor back to this one.

    `on_outcome` is called with 'done', 'failed', 'duplicate' (finished already by another attempt: this
    result was dropped), 'expired' or 'lost' (taken over by another replica before it started here).
    """

    def __init__(
        self,
        queue: JobQueue,
        consumer: str,
        handler: Handler,
        *,
        concurrency: int = 4,
        read_ahead: int = 0,
        on_outcome: Callable[[str], None] | None = None,
    ):
        self.queue = queue
        self.consumer = consumer
        self.handler = handler
        self.concurrency = concurrency
        self.read_ahead = read_ahead
        self._slots = asyncio.Semaphore(concurrency)
        self._held: dict[bytes, Job] = {}  # read and not finished, by stream entry id
        self._lost: set[bytes] = set()  # held jobs another consumer took over
        self._room = asyncio.Event()  # set when a held job finishes
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_outcome = on_outcome or (lambda outcome: None)

    @property
    def held(self) -> int:
        return len(self._held)

    async def run(self) -> None:
        await self.queue.ensure_group()
        renewer = asyncio.create_task(self._keep_claimed())
        last_reclaim = float("-inf")
        try:
            while True:
                try:
                    free = self.concurrency + self.read_ahead - len(self._held)
                    if free <= 0:
                        self._room.clear()
                        await self._room.wait()
                        continue
                    now = time.monotonic()
                    jobs: list[Job] = []
                    if now - last_reclaim > self.queue.claim_idle_ms / 2000:
                        last_reclaim = now
                        await self.queue.sweep()
                        jobs = await self.queue.reclaim(self.consumer, count=free, held=frozenset(self._held))
                    if not jobs:
                        jobs = await self.queue.read(self.consumer, count=free, block_ms=1000)
                    for job in jobs:
                        self._start(job)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis went away: keep trying, jobs are safe in the stream
                    log.error("queue worker %s: %s; retrying in 1 s", self.consumer, exc)
                    await asyncio.sleep(1.0)
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    def _start(self, job: Job) -> None:
        self._held[job.entry_id] = job
        task = asyncio.create_task(self._run_one(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_claimed(self) -> None:
        period = max(0.05, self.queue.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(period)
            jobs = [j for j in self._held.values() if j.entry_id not in self._lost]
            try:
                still_ours = await self.queue.renew(self.consumer, jobs)
            except Exception as exc:  # Redis away: held jobs are renewed again once it is back
                log.warning("queue worker %s: renewing %d jobs failed: %s", self.consumer, len(jobs), exc)
                continue
            for job, ours in zip(jobs, still_ours, strict=True):
                if not ours and job.entry_id in self._held:
                    self._lost.add(job.entry_id)

    async def _run_one(self, job: Job) -> None:
        try:
            async with self._slots:
                if job.entry_id in self._lost:
                    log.warning("job %s was taken over by another replica before it started here", job.id)
                    self._on_outcome("lost")
                    return
                self._on_outcome(await self._compute_and_finish(job))
        finally:
            self._held.pop(job.entry_id, None)
            self._lost.discard(job.entry_id)
            self._room.set()

    async def _compute_and_finish(self, job: Job) -> str:
        try:
            if job.attempt > self.queue.max_attempts:
                raise JobFailed(
                    f"job {job.id} gave up after {job.attempt - 1} attempts",
                    hint="the replicas that took it died while running it",
                )
            result = await self.handler(job.op, job.payload)
        except LunaError as exc:
            return await self.queue.fail(job, exc)
        except asyncio.CancelledError:
            raise  # the worker is stopping: the job stays pending and another replica takes it
        except Exception as exc:
            log.exception("job %s failed", job.id)
            return await self.queue.fail(job, JobFailed(f"job {job.id} failed: {exc}"))
        return await self.queue.complete(job, result)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
