"""Per-request LoRA for the CLIP and UNet services, never written into the shared weights.

    cache = LoraCache(capacity_bytes, device, dtype, redis=redis)      # once per service
    slots = attach_side_paths(model)                                   # once per model
    a = cache.resolve(path_a, model, "unet")                           # per request (memoised)
    with slots.plan(row_groups([(2, [(a, 0.8)]), (2, []), (4, [(a, 0.8), (b, -0.5)])])):
        out = model(x, ...)                                            # one batch, three stacks

Modules: lora_format (parse kohya / PEFT / LDM files), lora_resolve (bind to a model's module names),
lora_side (forward hooks computing the side path per row group), lora_cache (content-hash LRU + Redis).
"""

from luna_stack.lora.cache import LoraCache, LoraCacheStats
from luna_stack.lora.format import (
    COMPONENTS,
    Component,
    LoraFactors,
    LoraFile,
    LoraTarget,
    load_lora_bytes,
    parse_lora,
)
from luna_stack.lora.resolve import ResolvedLora, resolve
from luna_stack.lora.side import LoraSlots, RowGroup, Stack, attach_side_paths, row_groups

__all__ = [
    "COMPONENTS",
    "Component",
    "LoraCache",
    "LoraCacheStats",
    "LoraFactors",
    "LoraFile",
    "LoraSlots",
    "LoraTarget",
    "ResolvedLora",
    "RowGroup",
    "Stack",
    "attach_side_paths",
    "load_lora_bytes",
    "parse_lora",
    "resolve",
    "row_groups",
]
