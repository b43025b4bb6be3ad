"""Pipelined batches: a batch is queued behind the one the device runs, host results wait for their
batch, device-ordered (IPC) results leave at launch, and stepping clients whose forwards cost about their
rows split into two groups that alternate instead of one group the device idles for.

Real Batcher on a real GpuExecutor. The device is a queue with a clock, as a CUDA stream is to the host:
the batch function returns at once and its work ends `cost(rows)` after the previous batch's end; a mark
is that end and waiting for it sleeps until then. Assertions are on what ran when and with whom."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence

import pytest

from luna_stack.server.batch_costs import MAX_KEYS, BatchCosts
from luna_stack.server.batcher import Batcher
from luna_stack.server.executor import GpuExecutor

ROWS = 2


class QueueDevice:
    """The batch function and the marks of a device that runs queued batches one after another."""

    def __init__(self, cost: Callable[[int], float]):
        self.cost = cost
        self.free_at = 0.0
        self.batches: list[list[str]] = []
        self.launched: list[float] = []
        self.ends: list[float] = []

    def __call__(self, key: Hashable, items: Sequence[str]) -> list[str]:
        now = time.monotonic()
        self.free_at = max(now, self.free_at) + self.cost(ROWS * len(items))
        self.batches.append(list(items))
        self.launched.append(now)
        self.ends.append(self.free_at)
        return [f"{item}:done" for item in items]

    def mark(self) -> float:
        return self.free_at

    def wait(self, mark: float) -> None:
        time.sleep(max(0.0, mark - time.monotonic()))


@pytest.fixture
def executor():
    ex = GpuExecutor("test")
    yield ex
    ex.shutdown()


def _batcher(executor: GpuExecutor, device: QueueDevice, max_rows: int = 16) -> Batcher:
    return Batcher("t", device, executor, max_rows=max_rows, max_delay_ms=20, marks=device)


async def test_a_host_result_waits_for_its_batch_and_an_early_one_does_not(executor) -> None:
    device = QueueDevice(lambda rows: 0.2)
    batcher = _batcher(executor, device)
    try:
        assert await batcher.enqueue("k", "host", client="a") == "host:done"
        assert time.monotonic() >= device.ends[0]  # read on the host: after the device ran it
        assert await batcher.enqueue("k", "ipc", client="a", early=True) == "ipc:done"
        assert time.monotonic() < device.ends[1]  # ordered on the device: back at launch
        assert batcher.in_flight == 1
        while not batcher.idle:
            await asyncio.sleep(0.01)
    finally:
        await batcher.close()
    assert batcher.in_flight == 0 and batcher.turnaround("k") is not None


async def test_a_batch_is_queued_behind_the_running_one(executor) -> None:
    device = QueueDevice(lambda rows: 0.15)
    batcher = _batcher(executor, device)
    try:
        first = asyncio.create_task(batcher.enqueue("k", "a1", client="a"))
        await asyncio.sleep(0.03)  # a's batch runs; b arrives
        second = asyncio.create_task(batcher.enqueue("k2", "b1", client="b"))
        await asyncio.gather(first, second)
    finally:
        await batcher.close()
    assert device.batches == [["a1"], ["b1"]]
    assert device.launched[1] < device.ends[0]  # launched while the first still ran
    assert device.ends[1] == pytest.approx(device.ends[0] + 0.15)  # and ran right after it
    assert batcher.queued_behind == 1


async def _eight_stepping(
    device: QueueDevice, executor: GpuExecutor, turnaround_s: float, batches: int
) -> Batcher:
    batcher = _batcher(executor, device)

    async def client(name: str, start: float) -> None:
        await asyncio.sleep(start)
        while len(device.batches) < batches:
            await batcher.enqueue("k", name, rows=ROWS, client=name)
            await asyncio.sleep(turnaround_s)

    try:
        await asyncio.gather(*(client(f"c{i}", 0.002 * i) for i in range(8)))
    finally:
        await batcher.close()
    return batcher


async def test_forwards_that_cost_their_rows_alternate_two_groups_behind_each_other(executor) -> None:
    # Like SD1.5 on an H200: 16 rows cost twice 8; clients come back within half a 16-row forward.
    device = QueueDevice(lambda rows: 0.004 + 0.003 * rows)
    await _eight_stepping(device, executor, turnaround_s=0.015, batches=40)
    steady = device.batches[10:40]
    sizes = [ROWS * len(b) for b in steady]
    assert sum(sizes) / len(sizes) == pytest.approx(8, abs=1), sizes  # two halves, not one group of 16
    queued = sum(1 for i in range(10, 40) if device.launched[i] < device.ends[i - 1])
    assert queued >= 0.7 * len(steady), (queued, sizes)  # each launched while the other group ran


async def test_forwards_of_fixed_cost_still_merge_every_client(executor) -> None:
    # A forward costs the same whatever its rows (a small model): waiting for everyone is cheaper.
    device = QueueDevice(lambda rows: 0.03)
    await _eight_stepping(device, executor, turnaround_s=0.004, batches=24)
    sizes = [ROWS * len(b) for b in device.batches[6:24]]
    assert sum(sizes) / len(sizes) >= 0.9 * 16, sizes


def test_batch_costs_follow_new_samples_and_fit_sizes_not_run() -> None:
    costs = BatchCosts()
    assert costs.estimate("k", 8) is None
    costs.observe("k", 8, 0.027)
    assert costs.estimate("k", 8) == pytest.approx(0.027)
    assert costs.estimate("k", 16) is None  # one size: nothing extrapolated
    costs.observe("k", 16, 0.050)
    costs.observe("k", 2, 0.012)
    assert 0.027 < costs.estimate("k", 12) < 0.050  # an affine fit between the sizes run
    assert costs.estimate("k", 4) == pytest.approx(0.0169, abs=0.002)
    for _ in range(20):  # a graph captured: the same size now costs less
        costs.observe("k", 16, 0.040)
    assert costs.estimate("k", 16) == pytest.approx(0.040, abs=0.001)
    for other in range(MAX_KEYS):  # costs outlive idle spells; only keys least recently run go
        costs.observe(("other", other), 2, 0.01)
    assert costs.estimate("k", 16) is None and costs.estimate(("other", 0), 2) == 0.01
