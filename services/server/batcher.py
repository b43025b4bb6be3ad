"""Dynamic batching: concurrent requests with the same key run as one forward.

A key is whatever makes rows stackable (model, shape, dtype...). The dispatcher takes the key whose
oldest request waited longest and picks rows round-robin across clients, so one busy client cannot
starve the others. If a merged batch fails, each request is retried alone, so one bad request fails only
itself.

Filling a batch: clients step in a loop (send a step, get the result, send the next), so when the device
frees, the clients whose results were just delivered come back after a client turnaround (reply, the
sampler's own work, the next request). The batch waits for them: for every client recently active on
the key that has no request waiting, until it is full, for at most min(`max_delay_ms`, the key's
measured turnaround × `FILL_MARGIN`) from when the device freed or the oldest request arrived, whichever
is later. Without that wait, the requests that arrived during a forward would go alone as soon as it
ends and two half-batches would alternate forever. A lone client never waits (everyone recent is
waiting); a client that stopped stepping is waited for once in vain and then not again until it sends,
and is forgotten after a staleness window. Before any turnaround is measured on a key, the batch waits
at most `max_delay_ms` from its oldest request.

With graph `buckets` (the batch sizes that replay a captured CUDA graph, graphs.py), a batch that would
waste over a third of its bucket in padding, or exceed the largest bucket, leaves its last-picked requests
for the next batch: 10 rows with buckets 8/16 run as 8 now and 2 next, not as 16 (or 10 eager).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
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

FILL_MARGIN = 2.0  # a fill waits this many turnaround estimates (a high quantile already) for a client
TURNAROUND_QUANTILE = 0.9
TURNAROUND_SAMPLES = 32  # per key: recent enough to follow a change of clients, enough for the quantile
RECENT_BATCHES = 64  # the window of the mean batch size in /v1/status


@dataclass
class _Pending(Generic[I, R]):
    key: Hashable
    item: I
    rows: int
    client: str
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)
    deferred: bool = False  # left out of a full batch to fit a graph bucket: goes next, without waiting


@dataclass
class _Seen:
    """A client's latest request on a key: whom a filling batch may wait for."""

    enqueued: float
    rows: int
    delivered: float | None = None  # when that request's result was usable (its batch settled): turnaround
    missed: bool = False  # a fill waited for it in vain: not waited for again until it sends


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
        self.max_delay = max_delay_ms / 1000.0  # the cap on a fill's wait
        self._metrics = metrics
        self.buckets = tuple(sorted(buckets)) if buckets else ()
        self._pending: list[_Pending[I, R]] = []
        self._seen: dict[tuple[Hashable, str], _Seen] = {}
        # key -> recent turnarounds: a result resolved -> the same client's next request on that key
        self._turnarounds: dict[Hashable, deque[float]] = {}
        self._last_compute = 0.0
        self._freed = 0.0  # when the last batch finished: the device is free from then
        self._last_key: Hashable = None
        self._warned_cap = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.rows_total = 0
        self.largest_batch = 0
        self.recent_rows: deque[int] = deque(maxlen=RECENT_BATCHES)
        self.waits = 0  # fills that waited for a client
        self.wait_seconds = 0.0
        self.wait_timeouts = 0  # fills whose wait ended with a client still missing

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def mean_recent_rows(self) -> float | None:
        return sum(self.recent_rows) / len(self.recent_rows) if self.recent_rows else None

    def turnaround(self, key: Hashable) -> float | None:
        """The key's turnaround estimate in seconds (a high quantile of recent ones), None before one."""
        samples = sorted(self._turnarounds.get(key, ()))
        if not samples:
            return None
        return samples[math.ceil(TURNAROUND_QUANTILE * len(samples)) - 1]

    @property
    def last_turnaround(self) -> float | None:
        """The estimate on the key of the latest batch (what /v1/status shows)."""
        return self.turnaround(self._last_key)

    async def enqueue(self, key: Hashable, item: I, *, rows: int = 1, client: str = "") -> R:
        """Wait for the batch this item runs in and return its result."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._pending.append(_Pending(key, item, rows, client, future, now))
        self._note_arrival(key, client, rows, now)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            seen = self._seen.get((key, client))
            if seen is not None and seen.enqueued <= now:  # its client left: no batch waits for it
                del self._seen[(key, client)]
            raise

    def _note_arrival(self, key: Hashable, client: str, rows: int, now: float) -> None:
        seen = self._seen.get((key, client))
        if seen is not None and seen.delivered is not None and now - seen.delivered <= self._window():
            # Back within the window: a step turnaround (a longer gap is a new image, not a sample).
            samples = self._turnarounds.setdefault(key, deque(maxlen=TURNAROUND_SAMPLES))
            samples.append(now - seen.delivered)
        self._seen[(key, client)] = _Seen(now, rows)

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

    def _window(self) -> float:
        # A client between two steps comes back within about one forward; allow a few.
        return max(0.2, 4 * self._last_compute)

    def _forget_stale(self) -> None:
        """Clients not seen within the staleness window have stopped stepping; so have keys without any."""
        now = time.monotonic()
        for stale in [k for k, s in self._seen.items() if now - s.enqueued > self._window()]:
            del self._seen[stale]
        for gone in self._turnarounds.keys() - {k for k, _ in self._seen}:
            del self._turnarounds[gone]

    def _missing(self, key: Hashable) -> list[_Seen]:
        """Clients recently active on this key with no request waiting, whose next one would still fit."""
        # A client with a request waiting on any key is waiting for us, not the other way round.
        waiting = {p.client for p in self._pending if not p.future.done()}
        room = self.max_rows - self._ready_rows(key)
        return [
            s
            for (k, client), s in self._seen.items()
            if k == key and client not in waiting and not s.missed and s.rows <= room
        ]

    def _fill_deadline(self, oldest: _Pending[I, R]) -> float:
        estimate = self.turnaround(oldest.key)
        if estimate is None:  # nothing measured on this key yet: at most the cap from the oldest request
            return oldest.enqueued + self.max_delay
        if estimate > self.max_delay > 0 and not self._warned_cap:
            self._warned_cap = True
            log.info(
                "%s: clients send their next request %.1f ms after a result, longer than a batch may wait "
                "for them (max_delay_ms %.1f): raise it to merge their steps",
                self.op,
                estimate * 1000,
                self.max_delay * 1000,
            )
        return max(self._freed, oldest.enqueued) + min(self.max_delay, estimate * FILL_MARGIN)

    async def _fill(self, oldest: _Pending[I, R]) -> None:
        """Wait until the batch is full, every recently active client has a request waiting, or the
        deadline; clients still missing then are not waited for again until they send."""
        self._forget_stale()
        started = time.monotonic()
        waited = False
        while self._ready_rows(oldest.key) < self.max_rows and (missing := self._missing(oldest.key)):
            remaining = self._fill_deadline(oldest) - time.monotonic()
            if remaining <= 0:
                if waited:
                    self.wait_timeouts += 1
                    for s in missing:
                        s.missed = True
                break
            waited = True
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
        if waited:
            self.waits += 1
            self.wait_seconds += time.monotonic() - started

    async def _dispatch(self) -> None:
        while True:
            self._pending = [p for p in self._pending if not p.future.cancelled()]
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = min(self._pending, key=lambda p: p.enqueued)
            if not oldest.deferred:
                await self._fill(oldest)
            batch = self._take()
            if batch:
                await self._execute(batch)
                self._freed = time.monotonic()

    async def _execute(self, batch: list[_Pending[I, R]]) -> None:
        started = time.monotonic()
        rows = sum(p.rows for p in batch)
        if self._metrics is not None:
            for p in batch:
                self._metrics.queue_seconds.labels(op=self.op).observe(started - p.enqueued)
                self._metrics.stage("queue", started - p.enqueued)
            self._metrics.batch_rows.labels(op=self.op).observe(rows)
        self.batches += 1
        self.rows_total += rows
        self.largest_batch = max(self.largest_batch, rows)
        self.recent_rows.append(rows)
        self._last_key = batch[0].key
        try:
            results = await self._executor.run(self._run, batch[0].key, [p.item for p in batch])
        except Exception as exc:
            self._computed(started)
            if len(batch) == 1 or isinstance(exc, ClientGone | Unavailable):
                # Alone, or a failure no request caused (everyone left, the service is stopping).
                for p in batch:
                    self._resolve(p, error=exc)
                self._delivered(batch)
            else:
                log.warning(
                    "%s: batch of %d failed (%s); retrying each request alone", self.op, len(batch), exc
                )
                for p in batch:
                    await self._execute([p])
            return
        computed = time.monotonic()
        for p, result in zip(batch, results, strict=True):
            self._resolve(p, result=result)
        if self._metrics is not None:
            self._metrics.stage("compute", computed - started)
        if self._settle is not None:
            try:
                await self._executor.run(self._settle)
            except Exception:  # the results are out; a device error surfaces in the next batch
                log.exception("%s: waiting for the device after a batch failed", self.op)
            if self._metrics is not None:
                self._metrics.stage("settle", time.monotonic() - computed)
        self._delivered(batch)  # after settling: IPC clients read their outputs once the device is done
        self._computed(started)

    def _computed(self, started: float) -> None:
        self._last_compute = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.compute_seconds.labels(op=self.op).observe(self._last_compute)

    def _resolve(self, p: _Pending[I, R], *, result: Any = None, error: BaseException | None = None) -> None:
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)

    def _delivered(self, batch: list[_Pending[I, R]]) -> None:
        """The batch's results are usable by its clients: their turnarounds start now."""
        now = time.monotonic()
        for p in batch:
            seen = self._seen.get((p.key, p.client))
            if seen is not None and seen.enqueued <= p.enqueued:  # its latest request
                seen.delivered = now
