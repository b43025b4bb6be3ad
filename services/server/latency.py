"""Where a request's time goes, stage by stage, so an operator (and a benchmark) can see which part of
the path costs what: the recent medians and 90th percentiles in /v1/status `latency_ms`, the full
distributions in Prometheus (`luna_request_stage_seconds`).

inputs   the request's tensors ready: body read and decoded, or IPC buffers leased and the client's
         `ready` event complete, held tensors resolved
prepare  finiteness check, the model resolved, the family's checks, until the work is queued
queue    queued until its batch starts (the batcher's fill wait included)
compute  the batch's forward queued on the device and its outputs put (per batch)
settle   the device finishing that batch after it was queued (per batch; with the batch before it, if any)
reply    the results handed back until the reply is written
"""

from __future__ import annotations

import statistics
from collections import deque

STAGES = ("inputs", "prepare", "queue", "compute", "settle", "reply")
WINDOW = 512  # recent samples per stage


class StageTimes:
    def __init__(self, window: int = WINDOW):
        self._recent: dict[str, deque[float]] = {stage: deque(maxlen=window) for stage in STAGES}

    def add(self, stage: str, seconds: float) -> None:
        self._recent[stage].append(seconds)

    def describe(self) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        for stage, samples in self._recent.items():
            if not samples:
                continue
            ordered = sorted(samples)
            out[stage] = {
                "p50_ms": round(statistics.median(ordered) * 1000, 3),
                "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3),
                "samples": len(ordered),
            }
        return out
