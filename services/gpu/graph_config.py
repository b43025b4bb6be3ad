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


def capture_setting(start: str) -> Any:
    return setting(
        "start",
        f"start: capture every bucket for {start} when a model loads; lazy: capture each when first "
        "needed. Other shapes are always captured when first needed.",
        choices=("start", "lazy"),
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
    lazy: bool
    max_shapes: int
    lora_slots: int
    lora_rank: int

    @classmethod
    def of(cls, section: Any, name: str) -> GraphConfig:
        """Read a settings section's graph keys (`name` is the section, for error messages)."""
        return cls(
            enabled=section.graphs,
            buckets=parse_buckets(section.graph_buckets, f"{name}.graph_buckets"),
            lazy=section.graph_capture == "lazy",
            max_shapes=section.graph_max_shapes,
            lora_slots=section.lora_slots,
            lora_rank=section.lora_max_rank,
        )

    def active_on(self, device: Any) -> bool:
        """Graphs need CUDA: on a CPU the service stays eager whatever the setting."""
        return self.enabled and device.type == "cuda"

    def status(self, device: Any, runners: Iterable[Any]) -> dict[str, Any]:
        """The `graphs` block of a service's /v1/status (runners: its models' GraphRunners)."""
        return {
            "enabled": self.active_on(device),
            "buckets": list(self.buckets),
            "capture": "lazy" if self.lazy else "start",
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
