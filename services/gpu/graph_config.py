"""The graph keys the CLIP and UNet sections share (documented once here), checked into a `GraphConfig`.

Torch-free on purpose: settings modules are imported by `luna-stack config` and the config loader.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from luna_stack.config import setting
from luna_stack.wire.errors import ConfigError


def graphs_setting(what: str) -> Any:
    return setting(
        True, f"Run {what} through captured CUDA graphs (CUDA only; on a CPU the service stays eager)."
    )


def buckets_setting(default: list[str], rows: str) -> Any:
    return setting(
        default,
        f"Batch sizes ({rows}) that get a graph: a batch is padded up to the next one; larger batches run "
        "eager. env: comma-separated.",
    )


CAPTURE_MODES = ("background", "start", "first_use", "lazy")  # lazy: the old name of first_use


def capture_setting(start: str) -> Any:
    return setting(
        "background",
        "background: a model is ready once its weights are resident; a batch whose graph is not captured "
        "yet runs eager and its graph is captured while the service is idle (LoRA graphs only for slot "
        f"windows LoRA batches used); start: capture every bucket for {start} before the model is "
        "ready, other graphs when first needed, the request waiting (steady-state benchmarks); "
        "first_use (or lazy): capture each graph when first needed, the request waiting.",
        choices=CAPTURE_MODES,
    )


def min_gain_setting() -> Any:
    return setting(
        0.05,
        "A captured graph is kept only if its replay is at least this fraction faster than the eager "
        "forward (both timed at capture); otherwise it is freed and that batch size runs eager "
        "(reason no_gain). 0 keeps every graph not slower than eager.",
        minimum=0,
        maximum=0.99,
    )


def idle_ms_setting() -> Any:
    return setting(
        25.0,
        "Background graph captures start after the service has been idle this long (no request waiting "
        "or computing), one at a time; a request arriving meanwhile waits for at most one capture.",
        minimum=1,
    )


def release_idle_s_setting() -> Any:
    return setting(
        2.0,
        "After this long without requests, release the device memory the caching allocator keeps from "
        "eager batches (their activations), once per idle period; 0 = keep it.",
        minimum=0,
    )


def max_shapes_setting(shape: str) -> Any:
    return setting(
        8,
        f"Most distinct shapes ({shape}) that get graphs per model; batches of further shapes run eager "
        "(luna_graph_forwards_total).",
        minimum=1,
    )


def lora_slots_setting() -> Any:
    return setting(
        4,
        "LoRA adapters held at once in the graphs' static bank; a batch needing more distinct adapters "
        "runs eager. Bank memory and LoRA step cost grow with lora_slots × lora_max_rank; 0 = LoRA "
        "batches run eager.",
        minimum=0,
    )


def lora_rank_setting() -> Any:
    return setting(
        64,
        "Highest LoRA rank the bank holds; adapters of higher rank, or adapting kxk convs (LoCon), run "
        "eager.",
        minimum=1,
    )


@dataclass(frozen=True)
class GraphConfig:
    enabled: bool
    buckets: tuple[int, ...]
    capture: str  # background | start | first_use (CAPTURE_MODES; lazy is read as first_use)
    max_shapes: int
    lora_slots: int
    lora_rank: int
    min_gain: float | None = 0.05  # None: keep every graph untimed (benchmarks, correctness tests)
    idle_ms: float = 25.0
    release_idle_s: float = 2.0

    @classmethod
    def of(cls, section: Any, name: str) -> GraphConfig:
        """Read a settings section's graph keys (`name` is the section, for error messages)."""
        capture = section.graph_capture
        return cls(
            enabled=section.graphs,
            buckets=parse_buckets(section.graph_buckets, f"{name}.graph_buckets"),
            capture="first_use" if capture == "lazy" else capture,
            max_shapes=section.graph_max_shapes,
            lora_slots=section.lora_slots,
            lora_rank=section.lora_max_rank,
            min_gain=section.graph_min_gain,
            idle_ms=section.graph_idle_ms,
            release_idle_s=section.release_idle_s,
        )

    @property
    def background(self) -> bool:
        """Misses run eager and are captured when the service is idle (else: captured inline)."""
        return self.capture == "background"

    def active_on(self, device: Any) -> bool:
        """Graphs need CUDA: on a CPU the service stays eager whatever the setting."""
        return self.enabled and device.type == "cuda"

    def status(self, device: Any, runners: Iterable[Any]) -> dict[str, Any]:
        """The `graphs` block of a service's /v1/status (runners: its models' GraphRunners)."""
        return {
            "enabled": self.active_on(device),
            "buckets": list(self.buckets),
            "capture": self.capture,
            "min_gain": self.min_gain,
            "models": [r.describe() for r in runners],
        }


def parse_buckets(values: Iterable[Any], key: str) -> tuple[int, ...]:
    """Sorted, distinct positive batch sizes; a ConfigError naming the key and variable otherwise."""
    values = list(values)
    env = "LUNA_" + key.upper().replace(".", "_")
    try:
        buckets = sorted({int(str(v).strip()) for v in values})
    except ValueError:
        raise ConfigError(f"{key} must be positive integers, got {values!r} ({env})") from None
    if not buckets or buckets[0] < 1:
        raise ConfigError(f"{key} must list positive batch sizes, got {values!r} ({env})")
    return tuple(buckets)


def parse_latents(values: Iterable[Any], key: str) -> tuple[tuple[int, int], ...]:
    """`HxW` latent sizes as (height, width)."""
    out = []
    env = "LUNA_" + key.upper().replace(".", "_")
    for v in values:
        h, sep, w = str(v).strip().lower().partition("x")
        if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise ConfigError(f"{key} entries look like 128x128 (latent height x width), got {v!r} ({env})")
        out.append((int(h), int(w)))
    return tuple(out)


def round_up(buckets: Sequence[int], rows: int) -> int | None:
    """The smallest bucket holding `rows` (buckets sorted), None when none does."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None
