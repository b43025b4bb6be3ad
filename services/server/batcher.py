"""Dynamic batching: concurrent requests with the same key run as one forward.

A key is whatever makes rows stackable (model, shape, dtype...). The dispatcher takes the key whose
oldest request waited longest, lets the batch fill for at most `max_delay_ms` (or until `max_rows`, or
until every client recently active on that key has a request waiting, so a lone client never waits),
and picks rows round-robin across clients so one busy client cannot starve the others. If a merged
batch fails, each request is retried alone, so one bad request fails only itself.

With graph `buckets` (the batch sizes that replay a captured CUDA graph, graphs.py), a batch that would
waste over a third of its bucket in padding, or exceed the largest bucket, leaves its last-picked requests
for the next batch: 10 rows with buckets 8/16 run as 8 now and 2 next, not as 16 (or 10 eager).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from luna_stack.gpu.graph_config import round_up
from luna_stack.server.executor import GpuExecutor
from luna_stack.server.metrics import Metrics
from luna_stack.wire.errors import ClientGone, Unavailable

I = TypeVar("I")  # noqa: E741 - item type
R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass
class _Pending(Generic[I, R]):
    key: Hashable
    item: I
    rows: int
    client: str
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)
    deferred: bool = False  # left out of a full batch to fit a graph bucket: goes next, without waiting


class Batcher(Generic[I, R]):
    def __init__(
        self,
        op: str,
        run: Callable[[Hashable, Sequence[I]], Sequence[R]],
        executor: GpuExecutor,
        *,
        max_rows: int,
        max_delay_ms: float,
        metrics: Metrics | None = None,
        buckets: Sequence[int] | None = None,
        settle: Callable[[], None] | None = None,
    ):
        self.op = op
        # Blocks the compute thread until the device has run the batch. Runs after the results are handed
        # back (their replies leave while the GPU finishes: IPC outputs are ordered by events) and before
        # the next batch is taken, so batches form from the clients the last one served.
        self._settle = settle
        self._run = run
        self._executor = executor
        self.max_rows = max_rows
        self.max_delay = max_delay_ms / 1000.0
        self._metrics = metrics
        self.buckets = tuple(sorted(buckets)) if buckets else ()
        self._pending: list[_Pending[I, R]] = []
        # (key, client) -> when it last submitted: who may still join a filling batch.
        self._last_seen: dict[tuple[Hashable, str], float] = {}
        self._last_compute = 0.0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.rows_total = 0
        self.largest_batch = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    async def enqueue(self, key: Hashable, item: I, *, rows: int = 1, client: str = "") -> R:
        """Wait for the batch this item runs in and return its result."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(key, item, rows, client, future))
        self._last_seen[(key, client)] = time.monotonic()
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for p in self._pending:
            if not p.future.done():
                p.future.cancel()
        self._pending.clear()

    def _take(self) -> list[_Pending[I, R]]:
        """The next batch: the key with the oldest request, rows round-robin across clients."""
        key = min(self._pending, key=lambda p: p.enqueued).key
        same = [p for p in self._pending if p.key == key and not p.future.cancelled()]
        by_client: dict[str, list[_Pending[I, R]]] = {}
        for p in same:
            by_client.setdefault(p.client, []).append(p)
        chosen: list[_Pending[I, R]] = []
        rows = 0
        queues = list(by_client.values())
        while queues:
            for q in list(queues):
                p = q[0]
                if chosen and rows + p.rows > self.max_rows:
                    queues.remove(q)
                    continue
                chosen.append(q.pop(0))
                rows += p.rows
                if not q:
                    queues.remove(q)
        chosen = self._fit_bucket(chosen)
        picked = {id(p) for p in chosen}
        self._pending = [p for p in self._pending if id(p) not in picked and not p.future.cancelled()]
        return chosen

    def _fit_bucket(self, chosen: list[_Pending[I, R]]) -> list[_Pending[I, R]]:
        """Drop last-picked requests down to a bucket when padding would waste over a third of the next
        bucket up, or when no bucket holds the batch (a request is never split; one always stays)."""
        rows = sum(p.rows for p in chosen)
        if not self.buckets or len(chosen) < 2:
            return chosen
        padded = round_up(self.buckets, rows)
        if padded is not None and (padded - rows) * 3 <= padded:
            return chosen
        target = max((b for b in self.buckets if b < rows), default=None)
        if target is None:
            return chosen
        while len(chosen) > 1 and rows > target:
            left = chosen.pop()
            left.deferred = True
            rows -= left.rows
        return chosen

    def _ready_rows(self, key: Hashable) -> int:
        return sum(p.rows for p in self._pending if p.key == key)

    def _everyone_waiting(self, key: Hashable) -> bool:
        """True when no client that used this key lately is missing from the pending requests."""
        now = time.monotonic()
        # A client between two steps comes back within about one forward; allow a few.
        window = max(0.2, 4 * self._last_compute)
        for stale in [k for k, t in self._last_seen.items() if now - t > window]:
            del self._last_seen[stale]
        recent = {client for (k, client) in self._last_seen if k == key}
        return recent <= {p.client for p in self._pending if p.key == key}

    async def _dispatch(self) -> None:
        while True:
            self._pending = [p for p in self._pending if not p.future.cancelled()]
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = min(self._pending, key=lambda p: p.enqueued)
            deadline = oldest.enqueued + self.max_delay
            # Let the batch fill until it is full or the oldest request has waited max_delay.
            while (
                not oldest.deferred
                and self._ready_rows(oldest.key) < self.max_rows
                and time.monotonic() < deadline
                and not self._everyone_waiting(oldest.key)
            ):
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, deadline - time.monotonic()))
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Pending[I, R]]) -> None:
        started = time.monotonic()
        rows = sum(p.rows for p in batch)
        if self._metrics is not None:
            for p in batch:
                self._metrics.queue_seconds.labels(op=self.op).observe(started - p.enqueued)
            self._metrics.batch_rows.labels(op=self.op).observe(rows)
        self.batches += 1
        self.rows_total += rows
        self.largest_batch = max(self.largest_batch, rows)
        try:
            results = await self._executor.run(self._run, batch[0].key, [p.item for p in batch])
        except Exception as exc:
            self._computed(started)
            if len(batch) == 1 or isinstance(exc, ClientGone | Unavailable):
                # Alone, or a failure no request caused (everyone left, the service is stopping).
                for p in batch:
                    self._resolve(p, error=exc)
            else:
                log.warning(
                    "%s: batch of %d failed (%s); retrying each request alone", self.op, len(batch), exc
                )
                for p in batch:
                    await self._execute([p])
            return
        for p, result in zip(batch, results, strict=True):
            self._resolve(p, result=result)
        if self._settle is not None:
            try:
                await self._executor.run(self._settle)
            except Exception:  # the results are out; a device error surfaces in the next batch
                log.exception("%s: waiting for the device after a batch failed", self.op)
        self._computed(started)

    def _computed(self, started: float) -> None:
        self._last_compute = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.compute_seconds.labels(op=self.op).observe(self._last_compute)

    @staticmethod
    def _resolve(p: _Pending[I, R], *, result: Any = None, error: BaseException | None = None) -> None:
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)
