"""The dynamic batcher on its own: merging, a lone client's latency, fairness, failure isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence

import pytest

from luna_stack.server.batcher import Batcher
from luna_stack.server.executor import GpuExecutor
from luna_stack.wire.errors import InvalidTensor


class Recorder:
    """The batch function: records every batch it ran, answers each item with (item * 10)."""

    def __init__(self, compute_s: float = 0.0):
        self.batches: list[list[int]] = []
        self.compute_s = compute_s

    def __call__(self, key: Hashable, items: Sequence[int]) -> list[int]:
        if any(i < 0 for i in items):
            raise InvalidTensor("negative item")
        time.sleep(self.compute_s)
        self.batches.append(list(items))
        return [i * 10 for i in items]


@pytest.fixture
def executor():
    ex = GpuExecutor("test")
    yield ex
    ex.shutdown()


async def test_concurrent_clients_merge_and_each_gets_its_own_result(executor) -> None:
    run = Recorder()
    batcher = Batcher("t", run, executor, max_rows=8, max_delay_ms=200)
    for i in range(5):  # every client has been active lately, so the batch waits for all of them
        await batcher.enqueue("k", i, client=f"c{i}")
    run.batches.clear()
    results = await asyncio.gather(*(batcher.enqueue("k", i, client=f"c{i}") for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert run.batches == [[0, 1, 2, 3, 4]]
    await batcher.close()


async def test_a_lone_client_does_not_wait_for_the_delay(executor) -> None:
    batcher = Batcher("t", Recorder(), executor, max_rows=8, max_delay_ms=2000)
    started = time.monotonic()
    for i in range(3):
        assert await batcher.enqueue("k", i, client="only") == i * 10
    assert time.monotonic() - started < 1.0  # three steps, none waited 2 s for company
    await batcher.close()


async def test_busy_client_cannot_starve_another(executor) -> None:
    run = Recorder(compute_s=0.05)
    batcher = Batcher("t", run, executor, max_rows=2, max_delay_ms=0)
    busy = [asyncio.create_task(batcher.enqueue("k", i, client="busy")) for i in range(1, 9)]
    await asyncio.sleep(0.01)
    other = asyncio.create_task(batcher.enqueue("k", 100, client="other"))
    await asyncio.gather(*busy, other)
    position = next(n for n, batch in enumerate(run.batches) if 100 in batch)
    assert position <= 1, run.batches  # round-robin: in the first batch formed after it arrived
    await batcher.close()


async def test_one_bad_item_fails_only_its_own_request(executor) -> None:
    run = Recorder()
    batcher = Batcher("t", run, executor, max_rows=8, max_delay_ms=100)
    for c in "abc":
        await batcher.enqueue("k", 0, client=c)
    results = await asyncio.gather(
        batcher.enqueue("k", 1, client="a"),
        batcher.enqueue("k", -1, client="b"),
        batcher.enqueue("k", 3, client="c"),
        return_exceptions=True,
    )
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], InvalidTensor)
    await batcher.close()


async def test_different_keys_never_share_a_batch(executor) -> None:
    run = Recorder()
    batcher = Batcher("t", run, executor, max_rows=8, max_delay_ms=50)
    await asyncio.gather(*(batcher.enqueue(("shape", i % 2), i, client=f"c{i}") for i in range(6)))
    for batch in run.batches:
        assert len({i % 2 for i in batch}) == 1
    await batcher.close()
