"""Captured CUDA graphs of one model's forward, per input shape and batch-size bucket, with eager fallback.

Eager PyTorch is launch-bound at the batch sizes the services see (numbers in docs/design.md). A
`GraphRunner` keeps, per (shape, bucket, LoRA bank window: none, one slot, all slots), static input
buffers, a `torch.cuda.CUDAGraph` and its static outputs. A batch of n rows is copied into the first n
rows of the smallest bucket >= n, the graph is replayed and the first n output rows are returned. Padded
rows keep whatever they held: rows never mix in these models (per-sample norms, per-row attention), so
they cannot change the real rows.

The outputs are static buffers that the next replay overwrites: callers copy them out (`Sink.put`, a
clone) on the compute thread before anything else runs there.

All graphs of a runner share one memory pool: they never run concurrently and their outputs are copied
out at once, so the pool holds about the largest graph's activations (warm-up captures largest first).

A batch runs eager, counted in `luna_graph_forwards_total{path="eager", reason}`, when it has more rows
than the largest bucket ("rows"), it would be a shape beyond `max_shapes` ("shapes"), its LoRA stacks
do not fit the bank ("lora", see lora_bank.py), or its capture failed ("capture").

With `cuda_graphs=False` (what the CPU tests use) a replay runs the forward on the static buffers: the
same padding, slicing and LoRA bank, only not captured.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
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
WARMUP_RUNS = 2  # eager runs on the capture stream first: lazy inits, cuBLAS/cuDNN algorithm choice
LORA_SCALE = "lora_scale"


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


@dataclass
class Captured:
    shape: Hashable
    rows: int  # the bucket
    window: Window | None  # the LoRA bank slots this graph reads; None: no LoRA side path
    inputs: dict[str, torch.Tensor]
    outputs: Any
    graph: torch.cuda.CUDAGraph | None
    nbytes: int  # static inputs + the pool growth of this capture
    seconds: float
    replays: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "shape": str(self.shape),
            "rows": self.rows,
            "lora": self.window is not None,
            "lora_slots": list(self.window) if self.window is not None else None,
            "bytes": self.nbytes,
            "capture_ms": round(self.seconds * 1000, 1),
            "replays": self.replays,
        }


@dataclass
class GraphRunner:
    """The graphs of one model (or one encoder). Every method runs on the service's compute thread."""

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
    _graphs: dict[Key, Captured] = field(default_factory=dict)
    _failed: set[Key] = field(default_factory=set)
    _pool: Any = None
    eager: dict[str, int] = field(default_factory=dict)  # eager forwards by reason

    @property
    def shapes(self) -> set[Hashable]:
        return {shape for shape, _, _ in self._graphs} | {shape for shape, _, _ in self._failed}

    # -- capture --------------------------------------------------------------------------------------
    def warm_up(self, shapes: Iterable[Hashable]) -> None:
        """Capture every bucket of `shapes` (largest first: the smaller ones then fit in the shared pool),
        without the LoRA bank and with each of its slot windows. Nothing when graphs are off."""
        if not self.enabled:
            return
        windows: list[Window | None] = [None, *(self.bank.windows if self.bank is not None else [])]
        for shape in shapes:
            for rows in sorted(self.config.buckets, reverse=True):
                for window in windows:
                    if (shape, rows, window) not in self._graphs and len(self.shapes | {shape}) <= (
                        self.config.max_shapes
                    ):
                        self._capture(shape, rows, window)

    def _capture(self, shape: Hashable, rows: int, window: Window | None) -> Captured | None:
        key = (shape, rows, window)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                inputs = self.allocate(shape, rows)
                if window is not None:
                    assert self.bank is not None
                    width = (window[1] - window[0]) * self.bank.rank
                    inputs[LORA_SCALE] = torch.zeros(rows, width, device=self.device, dtype=self.bank.dtype)
                nbytes = sum(t.numel() * t.element_size() for t in inputs.values())
                graph = None
                outputs = None
                if self.cuda_graphs:
                    graph, outputs, pool_bytes = self._record(shape, inputs, window)
                    nbytes += pool_bytes
        except Exception as exc:  # an op that cannot be captured, out of memory: this key stays eager
            self._failed.add(key)
            log.warning("%s: capturing %s failed; it runs eager: %s", self.name, _label(*key), exc)
            return None
        captured = Captured(
            shape, rows, window, inputs, outputs, graph, nbytes, time.perf_counter() - started
        )
        self._graphs[key] = captured
        log.info(
            "%s: captured %s in %.2f s, %.1f MiB", self.name, _label(*key), captured.seconds, nbytes / 2**20
        )
        return captured

    def _record(
        self, shape: Hashable, inputs: dict[str, torch.Tensor], window: Window | None
    ) -> tuple[torch.cuda.CUDAGraph, Any, int]:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._call(shape, inputs, window)
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)
        # torch.cuda.graph collects and empties the cache on entry; doing it first makes the reserved
        # bytes before/after the capture measure this graph's pool growth alone.
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: other threads (IPC copies, another service in the process) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self._call(shape, inputs, window)
        torch.cuda.synchronize(self.device)
        return graph, outputs, torch.cuda.memory_reserved(self.device) - before

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
        elif shape not in self.shapes and len(self.shapes) >= self.config.max_shapes:
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
        if reason is None and key in self._failed:
            reason = "capture"
        elif reason is None:
            assert bucket is not None
            captured = self._graphs.get(key) or self._capture(shape, bucket, window)
            if captured is None:
                reason = "capture"
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
        inputs = {name: torch.cat(list(ts)) if len(ts) > 1 else ts[0] for name, ts in parts.items()}
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

    def _count(self, path: str, reason: str) -> None:
        if path == "eager":
            self.eager[reason] = self.eager.get(reason, 0) + 1
        if self.counter is not None:
            self.counter.labels(op=self.op, path=path, reason=reason).inc()

    def describe(self) -> dict[str, Any]:
        graphs = sorted(self._graphs.values(), key=lambda c: (str(c.shape), c.rows, c.window or (-1, -1)))
        return {
            "model": self.name,
            "cuda_graphs": self.cuda_graphs,
            "graphs": [c.describe() for c in graphs],
            "bytes": sum(c.nbytes for c in graphs),
            "replays": sum(c.replays for c in graphs),
            "eager": dict(self.eager),
            "failed": [_label(*key) for key in self._failed],
            "lora_bank": self.bank.describe() if self.bank is not None else None,
        }
