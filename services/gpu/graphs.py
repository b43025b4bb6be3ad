"""Captured CUDA graphs of one model's forward, per input shape and batch-size bucket, with eager fallback.

Eager PyTorch is launch-bound at the batch sizes the services see (numbers in docs/design.md). A
`GraphRunner` keeps, per (shape, bucket, LoRA bank window: none, one slot, all slots), static input
buffers, a `torch.cuda.CUDAGraph` and its static outputs. A batch of n rows is copied into the first n
rows of the smallest bucket >= n, the graph is replayed and the first n output rows are returned. Padded
rows keep whatever they held: rows never mix in these models (per-sample norms, per-row attention), so
they cannot change the real rows.

The outputs are static buffers that the next replay overwrites: callers copy them out (`Sink.put`, a
clone) on the compute thread before anything else runs there.

When graphs are captured (`GraphConfig.capture`): `background` — a batch whose key has no graph yet runs
eager ("pending") and the key is queued; the service calls `capture_next` (through `capture_one`) while
it is idle, keys traffic asked for first, then configured ones (`plan`). `start` / `first_use` — a miss
is captured inline, the batch waiting (`warm_up` captures configured shapes before the model is ready).

Every capture times the eager forward (its warm-up runs) against the graph's replay: a graph that is not
`min_gain` faster is freed and its key runs eager from then on ("no_gain"; GPU-bound batches gain
nothing and would hold the largest activations). Kept graphs of a runner share one memory pool: they
never run concurrently and their outputs are copied out at once, so the pool holds about the largest
graph's activations. A graph being timed is recorded into a pool of its own first, since blocks a graph
leaves in a shared pool stay reserved there after it is freed; a kept one is then recorded again into
the shared pool (the first kept graph's pool becomes it).

A batch runs eager, counted in `luna_graph_forwards_total{path="eager", reason}`, when it has more rows
than the largest bucket ("rows"), it would be a shape beyond `max_shapes` ("shapes"), its LoRA stacks
do not fit the bank ("lora", see lora/bank.py), its graph is not captured yet ("pending"), its capture
failed ("capture") or its graph gained nothing ("no_gain").

With `cuda_graphs=False` (what the CPU tests use) a replay runs the forward on the static buffers: the
same keys, queue, padding, slicing and LoRA bank, only not captured and not timed.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from luna_stack.gpu.graph_config import GraphConfig, round_up
from luna_stack.lora.bank import LoraBank, Window
from luna_stack.lora.side import LoraSlots, Stack, row_groups

log = logging.getLogger(__name__)
# The forward to capture: (shape, static inputs) -> outputs (tensors, or tuples/dicts/dataclasses of them).
Forward = Callable[[Hashable, dict[str, torch.Tensor]], Any]
# Static input buffers for (shape, bucket rows), leading dimension = rows.
Allocate = Callable[[Hashable, int], dict[str, torch.Tensor]]
# Eager runs on the capture stream first (lazy inits, cuBLAS/cuDNN algorithm choice); all but the first
# are timed, and so are TIMED_REPLAYS replays of the graph (the best of each is compared).
WARMUP_RUNS = 3
TIMED_REPLAYS = 3
LORA_SCALE = "lora_scale"


def keeps_graph(eager_s: float, replay_s: float, min_gain: float | None) -> bool:
    """The no-gain rule: a graph is kept only if its replay is at least `min_gain` (a fraction) faster
    than the eager forward it replaces; None keeps every graph (untimed)."""
    return min_gain is None or replay_s <= eager_s * (1.0 - min_gain)


def head(value: Any, rows: int) -> Any:
    """The first `rows` rows of every tensor in a forward's outputs (tensor, tuple, list, dict, dataclass)."""
    if isinstance(value, torch.Tensor):
        return value[:rows]
    if isinstance(value, (tuple, list)):
        return type(value)(head(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: head(v, rows) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: head(getattr(value, f.name), rows) for f in dataclasses.fields(value)}
        )
    return value


Key = tuple[Hashable, int, "Window | None"]  # (shape, bucket rows, LoRA bank slot window or None)


def _label(shape: Hashable, rows: int, window: Window | None) -> str:
    lora = "" if window is None else f" +LoRA slots {window[0]}..{window[1] - 1}"
    return f"{shape} x{rows}{lora}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass(frozen=True)
class Timing:
    """The best eager forward and graph replay of one key, timed at capture (seconds)."""

    eager_s: float
    replay_s: float

    def describe(self) -> dict[str, Any]:
        return {"eager_ms": _ms(self.eager_s), "replay_ms": _ms(self.replay_s)}


@dataclass
class Captured:
    shape: Hashable
    rows: int  # the bucket
    window: Window | None  # the LoRA bank slots this graph reads; None: no LoRA side path
    inputs: dict[str, torch.Tensor]
    outputs: Any
    graph: torch.cuda.CUDAGraph | None
    nbytes: int  # static inputs + pool_bytes
    pool_bytes: int  # the shared pool's growth when this graph was recorded into it
    seconds: float
    timing: Timing | None = None  # None: untimed (CPU, or min_gain None)
    replays: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "shape": str(self.shape),
            "rows": self.rows,
            "lora": self.window is not None,
            "lora_slots": list(self.window) if self.window is not None else None,
            "bytes": self.nbytes,
            "capture_ms": round(self.seconds * 1000, 1),
            **(self.timing.describe() if self.timing is not None else {"eager_ms": None, "replay_ms": None}),
            "replays": self.replays,
        }


@dataclass
class GraphRunner:
    """The graphs of one model (or one encoder). Every method runs on the service's compute thread, except
    `describe` (status, from the event loop: it reads snapshots)."""

    name: str  # for logs and status
    op: str  # metric label
    forward: Forward
    allocate: Allocate
    device: torch.device
    config: GraphConfig
    slots: LoraSlots | None = None  # the model's LoRA side paths: what eager batches run LoRA through
    bank: LoraBank | None = None
    counter: Any = None  # Metrics.graph_forwards (a prometheus Counter with op/path/reason labels)
    cuda_graphs: bool = True
    enabled: bool = True  # False (graphs off): every batch runs eager, uncounted
    weights_bytes: int = 0  # the model's (or encoder's) resident weights, for status
    _graphs: dict[Key, Captured] = field(default_factory=dict)
    _failed: set[Key] = field(default_factory=set)
    _no_gain: dict[Key, Timing] = field(default_factory=dict)
    # Keys waiting for a background capture (ordered sets): asked for by a batch, then configured ones.
    _requested: dict[Key, None] = field(default_factory=dict)
    _configured: dict[Key, None] = field(default_factory=dict)
    _pool: Any = None
    _side: Any = None  # the warm-up stream
    eager: dict[str, int] = field(default_factory=dict)  # eager forwards by reason

    @property
    def shapes(self) -> set[Hashable]:
        """Shapes that have, had or wait for a graph: what `max_shapes` counts."""
        keys = [*self._graphs, *self._failed, *self._no_gain, *self._requested, *self._configured]
        return {shape for shape, _, _ in keys}

    @property
    def queued(self) -> int:
        """Keys waiting for a background capture."""
        return len(self._requested) + len(self._configured)

    def _tried(self, key: Key) -> bool:
        return key in self._graphs or key in self._failed or key in self._no_gain

    def _bucket_keys(self, shapes: Iterable[Hashable], lora: bool) -> Iterable[Key]:
        """Every bucket of `shapes` (largest first), without the bank and, with `lora`, with each of its
        slot windows; shapes beyond `max_shapes` are left out."""
        windows: list[Window | None] = [None]
        if lora and self.bank is not None:
            windows += self.bank.windows
        for shape in shapes:
            for rows in sorted(self.config.buckets, reverse=True):
                for window in windows:
                    if len(self.shapes | {shape}) <= self.config.max_shapes:
                        yield (shape, rows, window)

    # -- capture --------------------------------------------------------------------------------------
    def plan(self, shapes: Iterable[Hashable]) -> None:
        """Queue every bucket of `shapes` (no LoRA) for background capture, after the keys batches ask
        for. Nothing when graphs are off."""
        if self.enabled:
            for key in self._bucket_keys(shapes, lora=False):
                if not self._tried(key) and key not in self._requested:
                    self._configured[key] = None

    def warm_up(self, shapes: Iterable[Hashable], *, lora: bool = True) -> None:
        """Capture every bucket of `shapes` now, largest first, without the LoRA bank and, with `lora`,
        with each of its slot windows (benchmarks and tests; the services capture a LoRA graph only for a
        window a LoRA batch used). Nothing when graphs are off."""
        if self.enabled:
            for key in self._bucket_keys(shapes, lora):
                if not self._tried(key):
                    self._capture(key)

    def capture_next(self) -> bool:
        """Capture the next queued key (asked for first, then configured); False when none was queued."""
        for queue in (self._requested, self._configured):
            while queue:
                key = next(iter(queue))
                tried = self._tried(key)
                if not tried:
                    self._capture(key)
                del queue[key]  # only now: /v1/status lists a key as pending until its capture is done
                if not tried:
                    return True
        return False

    def _capture(self, key: Key) -> Captured | None:
        """Record `key`'s graph (on the CPU: its static buffers); None when it failed or gained nothing,
        after which the key runs eager."""
        shape, rows, window = key
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                inputs = self.allocate(shape, rows)
                if window is not None:
                    assert self.bank is not None
                    width = (window[1] - window[0]) * self.bank.rank
                    inputs[LORA_SCALE] = torch.zeros(rows, width, device=self.device, dtype=self.bank.dtype)
                graph, outputs, pool_bytes, timing = None, None, 0, None
                if self.cuda_graphs:
                    graph, outputs, pool_bytes, timing = self._record(shape, inputs, window)
        except Exception as exc:  # an op that cannot be captured, out of memory: this key stays eager
            self._failed.add(key)
            log.warning("%s: capturing %s failed; it runs eager: %s", self.name, _label(*key), exc)
            return None
        seconds = time.perf_counter() - started
        if self.cuda_graphs and graph is None:
            assert timing is not None
            self._no_gain[key] = timing
            log.info(
                "%s: %s gains nothing (eager %.2f ms, replay %.2f ms): freed, it runs eager",
                self.name,
                _label(*key),
                timing.eager_s * 1000,
                timing.replay_s * 1000,
            )
            return None
        nbytes = sum(t.numel() * t.element_size() for t in inputs.values()) + pool_bytes
        captured = Captured(shape, rows, window, inputs, outputs, graph, nbytes, pool_bytes, seconds, timing)
        self._graphs[key] = captured
        log.info("%s: captured %s in %.2f s, %.1f MiB", self.name, _label(*key), seconds, nbytes / 2**20)
        return captured

    def _record(
        self, shape: Hashable, inputs: dict[str, torch.Tensor], window: Window | None
    ) -> tuple[torch.cuda.CUDAGraph | None, Any, int, Timing | None]:
        """Warm up (timing the eager forward), record and time the replay; the graph, its outputs and the
        shared pool's growth, or no graph when the no-gain rule drops it."""
        current = torch.cuda.current_stream(self.device)
        if self._side is None:  # one warm-up stream per runner: cuBLAS keeps a workspace per stream
            self._side = torch.cuda.Stream(self.device)
        side = self._side
        side.wait_stream(current)
        eager_s = math.inf
        with torch.cuda.stream(side):
            for i in range(WARMUP_RUNS):
                started = time.perf_counter()
                self._call(shape, inputs, window)
                torch.cuda.synchronize(self.device)
                if i:
                    eager_s = min(eager_s, time.perf_counter() - started)
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self.config.min_gain is None:
            graph, outputs, grown = self._record_into(shape, inputs, window, self._pool)
            self._pool = self._pool if self._pool is not None else graph.pool()
            return graph, outputs, grown, None
        # Timed in a pool of its own: a graph freed from the shared pool would leave its blocks reserved.
        graph, outputs, grown = self._record_into(shape, inputs, window, None)
        timing = Timing(eager_s, self._time_replay(graph))
        if not keeps_graph(timing.eager_s, timing.replay_s, self.config.min_gain):
            del graph, outputs
            torch.cuda.empty_cache()  # the graph's own pool goes back to the device
            return None, None, 0, timing
        if self._pool is None:  # the first kept graph's pool becomes the shared one
            self._pool = graph.pool()
            return graph, outputs, grown, timing
        del graph, outputs
        torch.cuda.empty_cache()
        graph, outputs, grown = self._record_into(shape, inputs, window, self._pool)
        return graph, outputs, grown, timing

    def _record_into(
        self, shape: Hashable, inputs: dict[str, torch.Tensor], window: Window | None, pool: Any
    ) -> tuple[torch.cuda.CUDAGraph, Any, int]:
        # torch.cuda.graph collects and empties the cache on entry; doing it first makes the reserved
        # bytes before/after the capture measure this graph's pool growth alone.
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (IPC copies, another service in the process) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = self._call(shape, inputs, window)
        torch.cuda.synchronize(self.device)
        return graph, outputs, torch.cuda.memory_reserved(self.device) - before

    def _time_replay(self, graph: torch.cuda.CUDAGraph) -> float:
        best = math.inf
        for _ in range(TIMED_REPLAYS):
            torch.cuda.synchronize(self.device)
            started = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - started)
        return best

    def _call(self, shape: Hashable, inputs: dict[str, torch.Tensor], window: Window | None) -> Any:
        if window is None or self.bank is None:
            return self.forward(shape, inputs)
        with self.bank.active(inputs[LORA_SCALE], window):
            return self.forward(shape, inputs)

    # -- running --------------------------------------------------------------------------------------
    def run(
        self,
        shape: Hashable,
        parts: Mapping[str, Sequence[torch.Tensor]],
        stacks: Sequence[tuple[int, Stack]],
    ) -> Any:
        """Outputs for a batch whose inputs are `parts` (per input name, the requests' tensors in row
        order) and whose rows use `stacks` ((rows, LoRA stack) per request, as lora.side.row_groups).
        The same `forward` runs eager, on the concatenated parts, when the batch cannot replay a graph."""
        if not self.enabled:
            return self.run_eager(shape, parts, stacks)
        rows = sum(n for n, _ in stacks)
        lora = any(strength != 0 for _, stack in stacks for _, strength in stack)
        bucket = round_up(self.config.buckets, rows)
        reason = None
        if bucket is None:
            reason = "rows"
        elif lora and self.bank is None:
            reason = "lora"
        elif shape not in (shapes := self.shapes) and len(shapes) >= self.config.max_shapes:
            reason = "shapes"
        scale, window = None, None
        if reason is None and lora:
            assert self.bank is not None and bucket is not None
            banked = self.bank.scale_table(stacks, bucket)  # fills bank slots (outside any capture)
            if banked is None:
                reason = "lora"
            else:
                scale, window = banked
        key: Key = (shape, bucket, window)  # type: ignore[assignment]
        captured = None
        if reason is None:
            captured = self._graphs.get(key)
            if captured is None and not self.config.background and not self._tried(key):
                captured = self._capture(key)  # start / first_use: the batch waits for its capture
            if captured is None:
                reason = self._eager_reason(key)
        if reason is not None or captured is None:
            self._count("eager", reason or "capture")
            return self.run_eager(shape, parts, stacks)
        with torch.inference_mode():
            self._fill(captured, parts, rows, scale)
            if captured.graph is not None:
                captured.graph.replay()
            else:
                captured.outputs = self._call(shape, captured.inputs, captured.window)
        captured.replays += 1
        self._count("graph", "")
        return head(captured.outputs, rows)

    def run_eager(
        self,
        shape: Hashable,
        parts: Mapping[str, Sequence[torch.Tensor]],
        stacks: Sequence[tuple[int, Stack]],
    ) -> Any:
        """The forward on the batch itself, LoRA stacks through the side paths' row-group plan."""
        # A merged batch may mix device tensors (IPC, held) with an HTTP request's host tensors.
        inputs = {
            name: torch.cat([t.to(self.device) for t in ts]) if len(ts) > 1 else ts[0]
            for name, ts in parts.items()
        }
        lora = any(strength != 0 for _, stack in stacks for _, strength in stack)
        with torch.inference_mode():
            if not lora:
                return self.forward(shape, inputs)
            if self.slots is None:
                raise ValueError(f"{self.name}: LoRA stacks for a model without LoRA side paths")
            with self.slots.plan(row_groups(stacks)):
                return self.forward(shape, inputs)

    def _fill(
        self,
        captured: Captured,
        parts: Mapping[str, Sequence[torch.Tensor]],
        rows: int,
        scale: torch.Tensor | None,
    ) -> None:
        for name, tensors in parts.items():
            static = captured.inputs[name]
            row = 0
            for t in tensors:
                if t.shape[1:] != static.shape[1:]:
                    raise ValueError(
                        f"{name}: a part of shape {list(t.shape)} for a graph of {list(static.shape)}"
                    )
                static[row : row + t.shape[0]].copy_(t, non_blocking=True)
                row += t.shape[0]
            if row != rows:
                raise ValueError(f"{name}: {row} rows given for a batch of {rows}")
        if scale is not None:
            captured.inputs[LORA_SCALE].copy_(scale, non_blocking=True)

    def _eager_reason(self, key: Key) -> str:
        """Why a key without a graph runs eager; a key not tried yet is queued for background capture."""
        if key in self._failed:
            return "capture"
        if key in self._no_gain:
            return "no_gain"
        self._configured.pop(key, None)
        self._requested.setdefault(key, None)
        return "pending"

    def _count(self, path: str, reason: str) -> None:
        if path == "eager":
            self.eager[reason] = self.eager.get(reason, 0) + 1
        if self.counter is not None:
            self.counter.labels(op=self.op, path=path, reason=reason).inc()

    def describe(self) -> dict[str, Any]:
        graphs = sorted(
            list(self._graphs.values()), key=lambda c: (str(c.shape), c.rows, c.window or (-1, -1))
        )
        no_gain = list(self._no_gain.items())
        bank = self.bank.describe() if self.bank is not None else None
        return {
            "model": self.name,
            "cuda_graphs": self.cuda_graphs,
            "graphs": [c.describe() for c in graphs],
            "bytes": sum(c.nbytes for c in graphs),  # every graph: static inputs + pool growth
            "pool_bytes": sum(c.pool_bytes for c in graphs),
            "weights_bytes": self.weights_bytes,
            "bank_bytes": bank["bytes"] if bank is not None else 0,
            "replays": sum(c.replays for c in graphs),
            "eager": dict(self.eager),
            "pending": [_label(*key) for key in [*list(self._requested), *list(self._configured)]],
            "no_gain": [{"graph": _label(*key), **t.describe()} for key, t in no_gain],
            "failed": [_label(*key) for key in list(self._failed)],
            "lora_bank": bank,
        }


def capture_one(runners: Iterable[GraphRunner]) -> bool:
    """One queued capture, of the first runner that has one (compute thread, while the service is idle);
    True while any runner still has keys queued."""
    runners = list(runners)
    for runner in runners:
        if runner.capture_next():
            break
    return any(runner.queued for runner in runners)
