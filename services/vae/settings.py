"""The `vae:` configuration section (env LUNA_VAE_*)."""

from __future__ import annotations

import dataclasses

from luna_stack.config import section, setting


@section("vae")
@dataclasses.dataclass
class VaeSettings:
    preload: list[str] = setting(
        [], "VAEs to load at start: names under vae/ or checkpoints/ (env: comma-separated)."
    )
    load_on_demand: bool = setting(True, "Load a VAE the first time a request names it.")
    max_batch: int = setting(8, "Most images decoded/encoded in one merged forward.", minimum=1)
    max_delay_ms: float = setting(
        5.0,
        "Longest a batch waits, once the GPU is free, for clients recently running the same operation on "
        "the same shape (their measured turnaround × 2, at most this; 0: never wait).",
        minimum=0,
    )
    tile_size: int = setting(
        512, "Default tile size in pixels for tiled operations and the OOM fallback.", minimum=64
    )
    tile_overlap: int = setting(64, "Default tile overlap in pixels.", minimum=0)
    max_pixels: int = setting(
        16 * 1024 * 1024,
        "Most pixels (batch × height × width) one untiled decode or encode may produce or send "
        "(16 Mi: four 2048² images).",
        minimum=64 * 64,
    )
    max_tiled_pixels: int = setting(
        256 * 1024 * 1024,
        "Most pixels (batch × height × width) one tiled decode or encode may cover (256 Mi: four 8K images).",
        minimum=64 * 64,
    )
    max_tiles: int = setting(
        8192, "Most tiles one tiled request may run (three passes × tiles per pass × batch).", minimum=3
    )
