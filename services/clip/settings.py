"""The `clip:` configuration section (env LUNA_CLIP_*)."""

from __future__ import annotations

import dataclasses

from luna_stack.config import section, setting
from luna_stack.gpu.graph_config import (
    GraphConfig,
    buckets_setting,
    capture_setting,
    graphs_setting,
    idle_ms_setting,
    lora_rank_setting,
    lora_slots_setting,
    max_shapes_setting,
    min_gain_setting,
    release_idle_s_setting,
)

FLUX_T5_MIN = 256  # the T5 sequence of a Flux prompt is padded to 256 tokens: the cap cannot be lower


@section("clip")
@dataclasses.dataclass
class ClipSettings:
    preload: list[str] = setting(
        [],
        "Text encoders to load at start: a checkpoint, a clip/ file, or "
        "'clip_l.safetensors+clip_g.safetensors' (env: comma-separated).",
    )
    load_on_demand: bool = setting(True, "Load a model the first time a request names it.")
    max_batch: int = setting(32, "Most 77-token chunks encoded in one merged forward.", minimum=1)
    max_delay_ms: float = setting(
        2.0,
        "Longest a batch waits, once the GPU is free, for clients recently encoding with the same model "
        "(their measured turnaround × 2, at most this; 0: never wait).",
        minimum=0,
    )
    max_chunks: int = setting(
        32, "Longest prompt accepted, in 75-token chunks (ComfyUI has no limit).", minimum=1, maximum=1024
    )
    max_t5_tokens: int = setting(
        512,
        "Longest T5-XXL token sequence accepted (Flux, SD3), counting `</s>`; ComfyUI has no limit. T5 "
        "attention grows with the square of the length and rows of one length batch together; 512 is "
        "what Flux-dev and SD3 were trained with (longer prompts are rarely useful).",
        minimum=FLUX_T5_MIN,
        maximum=8192,
    )
    max_prompt_chars: int = setting(
        32768,
        "Longest prompt accepted, in characters, checked before tokenizing (all texts of a request).",
        minimum=1,
    )
    max_loras: int = setting(16, "Most LoRAs in one request's stack.", minimum=0)
    cache: bool = setting(True, "Keep conditioning in Redis, shared by every replica (needs redis_url).")
    cache_ttl_s: int = setting(
        86400,
        "Lifetime of a cached conditioning entry, in seconds (entries also go first when Redis reaches "
        "its maxmemory).",
        minimum=1,
    )
    lora_cache_mb: int = setting(512, "Device memory for cached CLIP LoRA adapters (LRU).", minimum=1)
    graphs: bool = graphs_setting("the text encoders")
    graph_buckets: list[str] = buckets_setting(
        ["1", "2", "4", "8", "16", "32"], "77-token rows, weighted prompts add an empty-prompt row"
    )
    graph_capture: str = capture_setting("the family's default layer (clip skip)")
    graph_max_shapes: int = max_shapes_setting("the set of layers a batch reads: clip skip")
    lora_slots: int = lora_slots_setting()
    lora_max_rank: int = lora_rank_setting()
    graph_min_gain: float = min_gain_setting()
    graph_idle_ms: float = idle_ms_setting()
    release_idle_s: float = release_idle_s_setting()

    def __post_init__(self) -> None:
        GraphConfig.of(self, "clip")  # a bad bucket list stops the service at start, naming the key

    @property
    def graph(self) -> GraphConfig:
        return GraphConfig.of(self, "clip")
