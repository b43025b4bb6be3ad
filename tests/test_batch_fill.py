"""Full batches across stepping clients: N clients that each send a step, wait for its result and send
the next one after a short turnaround end up in one forward per step, not in alternating half-batches.

Real Batcher on a real GpuExecutor; the batch function sleeps for a forward. Assertions are on which
requests shared a forward and on the batcher's counters, not on elapsed time."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable, Sequence

import pytest

from luna_stack.server.batcher import Batcher
from luna_stack.server.executor import GpuExecutor

FORWARD_S = 0.04
CAP_MS = 20.0
ROWS = 2  # cond + uncond


class Forward:
    """The batch function: one forward of FORWARD_S; records the clients each batch served."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, key: Hashable, items: Sequence[str]) -> list[str]:
        time.sleep(FORWARD_S)
        self.batches.append(list(items))
        return [f"{item}:done" for item in items]


@pytest.fixture
def executor():
    ex = GpuExecutor("test")
    yield ex
    ex.shutdown()


async def _step_until(
    batcher: Batcher, name: str, done: Callable[[], bool], turnaround: Callable[[], float], start: float = 0
) -> int:
    """A sampler: step, get the result, think for a turnaround, step again, until `done()`."""
    await asyncio.sleep(start)
    steps = 0
    while not done():
        assert await batcher.enqueue("k", name, rows=ROWS, client=name) == f"{name}:done"
        steps += 1
        await asyncio.sleep(turnaround())
    return steps


async def _eight_clients(executor, turnarounds: list[Callable[[], float]], batches: int) -> list[int]:
    """Rows of the first `batches` forwards of eight clients that join 7 ms apart (the first steps
    alone, the next ones pile up behind it: the start of two alternating groups)."""
    run = Forward()
    batcher = Batcher("t", run, executor, max_rows=8 * ROWS, max_delay_ms=CAP_MS)
    done = lambda: len(run.batches) >= batches  # noqa: E731
    try:
        await asyncio.gather(
            *(_step_until(batcher, f"c{i}", done, t, start=0.007 * i) for i, t in enumerate(turnarounds))
        )
    finally:
        await batcher.close()
    # Every client stepped until `batches` forwards had run, so all eight were active in all of them.
    return [ROWS * len(b) for b in run.batches[:batches]]


async def test_eight_stepping_clients_share_one_forward_per_step(executor) -> None:
    rows = await _eight_clients(executor, [lambda: 0.003] * 8, batches=24)
    steady = rows[4:]
    assert sum(steady) / len(steady) >= 0.9 * 16, rows


async def test_full_batches_hold_with_jittered_turnarounds(executor) -> None:
    rngs = [random.Random(seed) for seed in range(8)]
    rows = await _eight_clients(executor, [lambda r=r: r.uniform(0.001, 0.006) for r in rngs], batches=24)
    steady = rows[4:]
    assert sum(steady) / len(steady) >= 0.9 * 16, rows


async def test_a_lone_stepping_client_never_waits(executor) -> None:
    run = Forward()
    batcher = Batcher("t", run, executor, max_rows=16, max_delay_ms=CAP_MS)
    try:
        steps = await _step_until(batcher, "only", lambda: len(run.batches) >= 10, lambda: 0.003)
    finally:
        await batcher.close()
    assert steps == 10 and run.batches == [["only"]] * 10
    assert (batcher.waits, batcher.wait_seconds, batcher.wait_timeouts) == (0, 0.0, 0)
    assert 0.003 <= batcher.last_turnaround < FORWARD_S  # result -> next request, not a step period


async def test_clients_that_stop_are_waited_for_once_then_not_at_all(executor) -> None:
    run = Forward()
    batcher = Batcher("t", run, executor, max_rows=16, max_delay_ms=CAP_MS)
    stop = lambda: len(run.batches) >= 8  # noqa: E731 - the first four finish their image
    stop_late = lambda: len(run.batches) >= 24  # noqa: E731
    try:
        stoppers = [_step_until(batcher, f"s{i}", stop, lambda: 0.003) for i in range(4)]
        stayers = [_step_until(batcher, f"k{i}", stop_late, lambda: 0.003) for i in range(4)]
        await asyncio.gather(*stoppers, *stayers)
    finally:
        await batcher.close()
    # The fills after the last batch with the stoppers: waited for them at most once in vain.
    last_with_stoppers = max(n for n, b in enumerate(run.batches) if any(c.startswith("s") for c in b))
    after = run.batches[last_with_stoppers + 1 : 24]
    assert len(after) >= 12, run.batches
    assert 1 <= batcher.wait_timeouts <= 3, (batcher.wait_timeouts, run.batches)
    # The four that go on still share one forward per step.
    assert sum(len(b) for b in after) / len(after) >= 0.9 * 4, after
    # Each wait ends by the cap (here with a loaded host's event-loop lag), not at the 200 ms staleness.
    assert batcher.wait_seconds <= batcher.waits * 3 * CAP_MS / 1000


async def _warm_up(batcher: Batcher, key: Hashable, clients: Sequence[str]) -> None:
    """Two steps together 10 ms apart: the clients are recent on `key` and their turnaround measured."""
    for _ in range(2):
        await asyncio.gather(*(batcher.enqueue(key, c, rows=ROWS, client=c) for c in clients))
        await asyncio.sleep(0.01)


async def test_a_client_that_abandoned_its_request_is_not_waited_for(executor) -> None:
    run = Forward()
    batcher = Batcher("t", run, executor, max_rows=16, max_delay_ms=CAP_MS)
    try:
        await _warm_up(batcher, "k", ["a", "b"])
        busy = asyncio.create_task(batcher.enqueue("k3", "z", rows=ROWS, client="z"))
        await asyncio.sleep(0.01)  # z's forward holds the device: b's step waits behind it
        left = asyncio.create_task(batcher.enqueue("k", "b", rows=ROWS, client="b"))
        await asyncio.sleep(0.005)
        left.cancel()  # b's client disconnected
        await busy
        for _ in range(4):
            await batcher.enqueue("k", "a", rows=ROWS, client="a")
            await asyncio.sleep(0.01)
    finally:
        await batcher.close()
    assert run.batches[2:] == [["z"]] + [["a"]] * 4, run.batches  # b's abandoned step never ran
    assert (batcher.waits, batcher.wait_timeouts) == (0, 0)  # nor did a wait for b again


async def test_a_client_waiting_on_another_key_is_not_waited_for(executor) -> None:
    """A client whose next request runs on another key (a negative prompt of another length) is waiting
    for the batcher: a fill on its old key must not wait for it."""
    run = Forward()
    batcher = Batcher("t", run, executor, max_rows=16, max_delay_ms=CAP_MS)
    try:
        await _warm_up(batcher, "k1", ["x", "y"])
        busy = asyncio.create_task(batcher.enqueue("k3", "z", rows=ROWS, client="z"))
        await asyncio.sleep(0.01)  # z's forward holds the device; y's step, then x's on k2 queue behind
        y = asyncio.create_task(batcher.enqueue("k1", "y", rows=ROWS, client="y"))
        await asyncio.sleep(0.001)
        x = asyncio.create_task(batcher.enqueue("k2", "x", rows=ROWS, client="x"))
        await asyncio.gather(busy, y, x)
    finally:
        await batcher.close()
    assert run.batches[2:] == [["z"], ["y"], ["x"]]
    assert (batcher.waits, batcher.wait_timeouts) == (0, 0)
