"""A request's LoRA stack as clients send it: `"lora": [{"name": "x.safetensors", "strength": 0.8}, ...]`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest, LimitExceeded

EXAMPLE = '[{"name": "x.safetensors", "strength": 0.8}]'


def parse_stack(raw: Any, roots: ModelRoots, max_loras: int | None = None) -> list[tuple[Path, float]]:
    """(file under loras/, strength) per entry, in order; strength 0 entries are dropped (no effect)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"params.lora must be a list like {EXAMPLE}")
    if max_loras is not None and len(raw) > max_loras:
        raise LimitExceeded(
            f"{len(raw)} LoRAs in one request; at most {max_loras} are allowed",
            hint="raise max_loras in the service's section (LUNA_UNET_MAX_LORAS / LUNA_CLIP_MAX_LORAS)",
        )
    stack = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        strength = item.get("strength", 1.0) if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise BadRequest(f"invalid LoRA entry {item!r}", hint=f"entries look like {EXAMPLE}")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise BadRequest(f"LoRA {name}: strength must be a finite number, got {strength!r}")
        path = roots.resolve(name, ["loras"])
        if strength != 0:
            stack.append((path, float(strength)))
    return stack
