"""The `unet:` configuration section (env LUNA_UNET_*)."""

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
    parse_latents,
    release_idle_s_setting,
)


@section("unet")
@dataclasses.dataclass
class UnetSettings:
    preload: list[str] = setting(
        [],
        "UNets to load at start: names or relative paths under checkpoints/ or unet/ (.safetensors, "
        ".gguf); env: comma-separated.",
    )
    load_on_demand: bool = setting(True, "Load a UNet the first time a request names it.")
    precision: str = setting(
        "auto",
        "Weight storage: auto (the core dtype), fp32, fp16, bf16, fp8 (e4m3 storage, bf16 compute). "
        "GGUF files keep their quantization and compute in the core dtype; fp8 files stay fp8.",
        choices=("auto", "fp32", "fp16", "bf16", "fp8"),
    )
    flux_precision: str = setting(
        "auto",
        "Weight storage of Flux models: auto (bf16 on CUDA, where Flux.1 is trained and fp16 overflows; "
        "elsewhere as unet.precision; an explicit unet.precision wins), fp32, fp16, bf16, fp8.",
        choices=("auto", "fp32", "fp16", "bf16", "fp8"),
    )
    batching: bool = setting(True, "Merge concurrent steps of the same model and shape into one forward.")
    max_batch: int = setting(
        16, "Most latent rows in one forward; a single request with more rows is rejected.", minimum=1
    )
    max_delay_ms: float = setting(
        20.0,
        "Longest a batch waits, once the GPU is free, for the next steps of clients recently stepping the "
        "same model and shape (the wait is their measured turnaround × 2, at most this; 0: never wait).",
        minimum=0,
    )
    max_latent_pixels: int = setting(
        512 * 1024,
        "Most latent pixels one step may carry, rows × height × width (512 Ki: 8 rows of a 2048² "
        "image's 256² latent).",
        minimum=64,
    )
    lora_cache_mb: float = setting(2048.0, "Device memory for cached LoRA adapters, in MiB.", minimum=1)
    max_loras: int = setting(16, "Most LoRAs in one request's stack.", minimum=0)
    graphs: bool = graphs_setting("steps")
    graph_buckets: list[str] = buckets_setting(
        ["1", "2", "4", "8", "16"], "latent rows; CFG sends 2 per step"
    )
    graph_capture: str = capture_setting("the graph_latents sizes at 77 context tokens")
    graph_latents: list[str] = setting(
        [],
        "Latent sizes HxW (at 77 context tokens) whose graphs are captured without waiting for traffic: "
        "before ready with graph_capture=start (empty = the family's native size: SDXL 128x128, SD1.5 "
        "64x64), after the graphs traffic asked for with background (empty = none). env: comma-separated.",
    )
    graph_max_shapes: int = max_shapes_setting("latent size, context length, ControlNet slots")
    lora_slots: int = lora_slots_setting()
    lora_max_rank: int = lora_rank_setting()
    graph_min_gain: float = min_gain_setting()
    graph_idle_ms: float = idle_ms_setting()
    release_idle_s: float = release_idle_s_setting()

    def __post_init__(self) -> None:
        GraphConfig.of(self, "unet")  # a bad bucket list stops the service at start, naming the key
        parse_latents(self.graph_latents, "unet.graph_latents")

    @property
    def graph(self) -> GraphConfig:
        return GraphConfig.of(self, "unet")
