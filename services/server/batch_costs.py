"""What a forward costs the device, per batch key and padded row count, as the batcher measures it.

A batch's device time is from when the device could start it (its launch, or the end of the batch queued
before it) to when it finished. The batcher asks for sizes it has not run yet too: they come from an
affine fit of the sizes it has run, which is what GPU-bound forwards follow (e.g. SD1.5 512² on an
H200: 12 ms for 2 rows, 27 for 8, 50 for 16); from one size alone nothing is extrapolated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

EMA = 0.3  # weight of a new sample: follows a change (a graph captured, eager -> replay) within a few
MAX_KEYS = 64  # keys kept, least recently run dropped first (a key is a model and shape, not a client)


class BatchCosts:
    def __init__(self) -> None:
        self._by_key: OrderedDict[Hashable, dict[int, float]] = OrderedDict()

    def observe(self, key: Hashable, rows: int, seconds: float) -> None:
        sizes = self._by_key.setdefault(key, {})
        self._by_key.move_to_end(key)
        old = sizes.get(rows)
        sizes[rows] = seconds if old is None else old + EMA * (seconds - old)
        if len(self._by_key) > MAX_KEYS:
            self._by_key.popitem(last=False)

    def estimate(self, key: Hashable, rows: int) -> float | None:
        """Seconds a batch of `rows` (padded) takes on `key`; None for a size not run, unless two ran."""
        sizes = self._by_key.get(key, {})
        if rows in sizes:
            return sizes[rows]
        if len(sizes) < 2:
            return None
        n = len(sizes)
        mean_r = sum(sizes) / n
        mean_s = sum(sizes.values()) / n
        spread = sum((r - mean_r) ** 2 for r in sizes)
        slope = sum((r - mean_r) * (s - mean_s) for r, s in sizes.items()) / spread
        return max(0.0, mean_s + slope * (rows - mean_r))
