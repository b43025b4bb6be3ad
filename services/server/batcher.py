"""Dynamic batching: concurrent requests with the same key run as one forward.

A key is whatever makes rows stackable (model, shape, dtype...). The dispatcher takes the key whose
oldest request waited longest and picks rows round-robin across clients, so one busy client cannot
starve the others. If a merged batch fails, each request is retried alone, so one bad request fails only
itself.

Pipelining: a batch is launched (its work queued on the device) and the next one may be formed and
queued behind it while it runs, up to PIPELINE_DEPTH batches in flight, so the device does not sit idle
while its clients turn round. Results whose reply is ordered on the device (IPC outputs, recorded
behind an event) are handed back at launch; results read on the host wait for their batch to finish.
Without a device (`marks` None) a batch is finished when its function returns.

Filling a batch: clients step in a loop (send a step, get the result, send the next), so the clients
whose results were just delivered come back after a client turnaround T (reply, the sampler's own work,
the next request). The batcher plans one of two shapes per key from what it measured (`BatchCosts`: the
device time per padded size; T, a high quantile of recent turnarounds):
- two groups, half the key's active rows each, when max(c(a) + c(b), T + max(c(a), c(b))) beats
  c(a + b) + T by SPLIT_GAIN: each group fills while the other runs, waiting for its missing clients
  until just before the running batch is estimated to end, and is queued behind it, so the device runs
  back to back (on a GPU a GPU-bound forward costs about its rows: two halves win by about T);
- otherwise one group: a batch waits for every recently active client, one still in flight until its
  batch is done, then at most min(`max_delay_ms`, T × `FILL_MARGIN`) from when the device freed or the
  oldest request arrived, whichever is later (and no less while other batches still run). Before costs
  and T are measured, and without a device, it is always one group.
A lone client never waits (everyone recent is waiting); a client that stopped stepping is waited for once
in vain and then not again until it sends, and is forgotten after a staleness window.

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
from typing import Any, Generic, Protocol, TypeVar

from luna_stack.gpu.graph_config import round_up
from luna_stack.server.batch_costs import BatchCosts
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
PIPELINE_DEPTH = 2  # batches in flight: one running, one queued behind it
LAUNCH_MARGIN_S = 0.002  # a batch filling behind in-flight work is launched this long before it ends
SPLIT_GAIN = 0.05  # two alternating groups only when they cycle this much faster than one


class DeviceMarks(Protocol):
    """Completion of the work queued on the compute device (gpu.device.StreamMarks on CUDA)."""

    def mark(self) -> Any:
        """On the compute thread, after a batch's work is queued: a mark of that point."""

    def wait(self, mark: Any) -> None:
        """Block until the work before `mark` has run (called from a worker thread)."""


@dataclass
class _Pending(Generic[I, R]):
    key: Hashable
    item: I
    rows: int
    client: str
    future: asyncio.Future[R]
    early: bool  # its result may be handed back at launch (the reply is ordered on the device)
    enqueued: float = field(default_factory=time.monotonic)
    deferred: bool = False  # left out of a full batch to fit a graph bucket: goes next, without waiting


@dataclass
class _Seen:
    """A client's latest request on a key: whom a filling batch may wait for."""

    enqueued: float
    rows: int
    delivered: float | None = None  # when that request's result was usable (its batch finished): turnaround
    missed: bool = False  # a fill waited for it in vain: not waited for again until it sends


@dataclass
class _Flight(Generic[I, R]):
    """A launched batch the device has not finished."""

    batch: list[_Pending[I, R]]
    results: Sequence[R]
    started: float
    launched: float
    ends: float | None  # estimated: when the device will have run it
    task: asyncio.Task[None] | None = None


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
        marks: DeviceMarks | None = None,
    ):
        self.op = op
        self._run = run
        self._executor = executor
        self._marks = marks
        self.max_rows = max_rows
        self.max_delay = max_delay_ms / 1000.0  # the cap on a fill's wait with the device idle
        self._metrics = metrics
        self.buckets = tuple(sorted(buckets)) if buckets else ()
        self._pending: list[_Pending[I, R]] = []
        self._flying: deque[_Flight[I, R]] = deque()
        self._seen: dict[tuple[Hashable, str], _Seen] = {}
        # key -> recent turnarounds: a result resolved -> the same client's next request on that key
        self._turnarounds: dict[Hashable, deque[float]] = {}
        self.costs = BatchCosts()
        self._last_compute = 0.0
        self._freed = 0.0  # when the last batch finished: the device is free from then if none flies
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
        self.queued_behind = 0  # batches launched while another was in flight

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._flying)

    @property
    def idle(self) -> bool:
        """No request waits and the device runs no batch of ours."""
        return not self._pending and not self._flying

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

    async def enqueue(
        self, key: Hashable, item: I, *, rows: int = 1, client: str = "", early: bool = False
    ) -> R:
        """Wait for the batch this item runs in and return its result: at launch with `early` (its
        consumer is ordered behind the batch on the device), else once the device has run it."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._pending.append(_Pending(key, item, rows, client, future, early, now))
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
        for flight in list(self._flying):
            if flight.task is not None:
                flight.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flight.task
        waiting = [p for f in self._flying for p in f.batch]
        self._flying.clear()
        for p in [*waiting, *self._pending]:
            if not p.future.done():
                p.future.cancel()
        self._pending.clear()

    def _take(self, limit: int) -> list[_Pending[I, R]]:
        """The next batch: the key with the oldest request, rows round-robin across clients, at most
        `limit` rows (a group's, when two alternate: the rest go next, without waiting)."""
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
                if chosen and rows + p.rows > limit:
                    p.deferred = p.deferred or limit < self.max_rows
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

    def _padded(self, rows: int) -> int:
        return (round_up(self.buckets, rows) or rows) if self.buckets else rows

    def _cost(self, key: Hashable, rows: int) -> float | None:
        return self.costs.estimate(key, self._padded(min(rows, self.max_rows)))

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

    def _flying_clients(self) -> set[str]:
        return {p.client for f in self._flying for p in f.batch}

    def _missing(self, key: Hashable, *, flying: bool) -> list[tuple[str, _Seen]]:
        """Clients recently active on this key with no request waiting (nor in flight, unless `flying`),
        whose next one would still fit."""
        # A client with a request waiting on any key is waiting for us, not the other way round.
        busy = {p.client for p in self._pending if not p.future.done()}
        if not flying:  # it comes back only after its batch: the next group's, not this one's
            busy |= self._flying_clients()
        room = self.max_rows - self._ready_rows(key)
        return [
            (client, s)
            for (k, client), s in self._seen.items()
            if k == key and client not in busy and not s.missed and s.rows <= room
        ]

    def _idle_deadline(self, oldest: _Pending[I, R]) -> float:
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

    def _split(self, key: Hashable) -> int | None:
        """Rows per group when the key's active clients cycle faster as two groups, each queued while the
        other runs, than as one group the device idles for during their turnaround T: with forwards
        costing c(rows), max(c(a) + c(b), T + max(c(a), c(b))) < c(a + b) + T. None: one group (also
        before the costs and T are measured). GPU-bound forwards cost about their rows, so on a fast
        GPU two halves win by about T; a forward of fixed cost (a small model) keeps one group."""
        if self._marks is None:  # nothing runs behind a batch in flight: groups could not overlap
            return None
        active = sum(s.rows for (k, _), s in self._seen.items() if k == key)
        turnaround = self.turnaround(key)
        half = self._padded(math.ceil(active / 2))
        if turnaround is None or active < 2 or half >= self.max_rows:
            return None
        one, a, b = self._cost(key, active), self._cost(key, half), self._cost(key, active - half)
        if one is None or a is None or b is None:
            return None
        two = max(a + b, turnaround + max(a, b))
        return half if two < (one + turnaround) * (1 - SPLIT_GAIN) else None

    def _fill_deadline(self, oldest: _Pending[I, R], split: bool, in_flight: bool) -> float:
        """Until when a batch waits for missing clients. One in flight (one group) is waited for until its
        batch is done, then for the fill cap. While batches fly, waiting costs the device nothing: until
        just before they are estimated to end (two groups: no longer, the device must not idle)."""
        if in_flight:
            return math.inf  # re-planned when its batch is done (that wakes the dispatcher)
        idle = self._idle_deadline(oldest)
        ends = self._flying[-1].ends if self._flying else None
        if ends is None:
            return idle
        return ends - LAUNCH_MARGIN_S if split else max(idle, ends - LAUNCH_MARGIN_S)

    async def _fill(self, oldest: _Pending[I, R]) -> int:
        """Wait until the batch has its rows (every row, or a group's when two groups alternate), every
        recently active client has a request waiting, or the deadline; clients still missing then are
        not waited for again until they send. Returns the rows the batch may take."""
        self._forget_stale()
        started = time.monotonic()
        waited = False
        while True:
            split = self._split(oldest.key)
            limit = split or self.max_rows
            missing = self._missing(oldest.key, flying=split is None)
            if self._ready_rows(oldest.key) >= limit or not missing:
                break
            flying = self._flying_clients()
            in_flight = any(client in flying for client, _ in missing)
            remaining = self._fill_deadline(oldest, split is not None, in_flight) - time.monotonic()
            if remaining <= 0:
                if waited:
                    self.wait_timeouts += 1
                    for _, s in missing:
                        s.missed = True
                break
            waited = True
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), timeout=None if math.isinf(remaining) else remaining
                )
        if waited:
            self.waits += 1
            self.wait_seconds += time.monotonic() - started
        return limit

    async def _dispatch(self) -> None:
        while True:
            self._pending = [p for p in self._pending if not p.future.cancelled()]
            if not self._pending or len(self._flying) >= PIPELINE_DEPTH:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = min(self._pending, key=lambda p: p.enqueued)
            limit = self.max_rows if oldest.deferred else await self._fill(oldest)
            if len(self._flying) >= PIPELINE_DEPTH or not self._pending:
                continue
            batch = self._take(limit)
            if batch:
                await self._execute(batch)

    def _launch(self, key: Hashable, items: list[I]) -> tuple[Sequence[R], Any]:
        results = self._run(key, items)
        return results, (self._marks.mark() if self._marks is not None else None)

    async def _execute(self, batch: list[_Pending[I, R]]) -> None:
        started = time.monotonic()
        key = batch[0].key
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
        self._last_key = key
        try:
            results, mark = await self._executor.run(self._launch, key, [p.item for p in batch])
        except Exception as exc:
            self._computed(started)
            if len(batch) == 1 or isinstance(exc, ClientGone | Unavailable):
                # Alone, or a failure no request caused (everyone left, the service is stopping).
                for p in batch:
                    self._resolve(p, error=exc)
                self._delivered(batch, time.monotonic())
            else:
                log.warning(
                    "%s: batch of %d failed (%s); retrying each request alone", self.op, len(batch), exc
                )
                for p in batch:
                    await self._execute([p])
            return
        launched = time.monotonic()
        if self._metrics is not None:
            self._metrics.stage("compute", launched - started)
        cost = self._cost(key, rows)
        previous = self._flying[-1] if self._flying else None
        if previous is not None:
            self.queued_behind += 1
        begins = started if previous is None or previous.ends is None else max(started, previous.ends)
        flight = _Flight(batch, results, started, launched, None if cost is None else begins + cost)
        for p, result in zip(batch, results, strict=True):
            if p.early:
                self._resolve(p, result=result)
        if mark is None:  # no device: the function's return is the batch's end
            self._finished(flight, launched)
            return
        self._flying.append(flight)
        flight.task = asyncio.create_task(self._until_done(flight, mark, previous))

    async def _until_done(self, flight: _Flight[I, R], mark: Any, previous: _Flight[I, R] | None) -> None:
        if previous is not None and previous.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(previous.task)  # finishes in launch order: costs count from it
        assert self._marks is not None
        try:
            await asyncio.to_thread(self._marks.wait, mark)
        except Exception:  # the results are out; a device error surfaces in the next batch
            log.exception("%s: waiting for the device after a batch failed", self.op)
        now = time.monotonic()
        if self._metrics is not None:
            self._metrics.stage("settle", now - flight.launched)
        self._finished(flight, now)
        self._flying.remove(flight)
        self._wakeup.set()

    def _finished(self, flight: _Flight[I, R], now: float) -> None:
        """The device has run the batch: host results go back, turnarounds and its cost count from now."""
        batch = flight.batch
        rows = sum(p.rows for p in batch)
        self.costs.observe(batch[0].key, self._padded(rows), now - max(flight.started, self._freed))
        for p, result in zip(batch, flight.results, strict=True):
            self._resolve(p, result=result)
        self._delivered(batch, now)
        self._computed(flight.started, now)
        self._freed = now

    def _computed(self, started: float, now: float | None = None) -> None:
        self._last_compute = (time.monotonic() if now is None else now) - started
        if self._metrics is not None:
            self._metrics.compute_seconds.labels(op=self.op).observe(self._last_compute)

    def _resolve(self, p: _Pending[I, R], *, result: Any = None, error: BaseException | None = None) -> None:
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)

    def _delivered(self, batch: list[_Pending[I, R]], now: float) -> None:
        """The batch's results are usable by its clients: their turnarounds start now."""
        for p in batch:
            seen = self._seen.get((p.key, p.client))
            if seen is not None and seen.enqueued <= p.enqueued:  # its latest request
                seen.delivered = now
