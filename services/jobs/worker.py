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
