"""Conversions between ComfyUI's data (LATENT, IMAGE, CONDITIONING, token lists, control dicts) and the
services' wire format. No ComfyUI import: everything here is testable on its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from luna_stack.wire.contract import CONTROL_KINDS, SIZE_KEYS

from .errors import LunaStackError


def tokens_to_wire(
    tokens: Mapping[str, Sequence[Sequence[Sequence[Any]]]],
) -> dict[str, list[list[list[Any]]]]:
    """ComfyUI's tokenizer output ({"l": [[(id, weight[, word_id]), ...], ...]}) as JSON chunks.

    Textual-inversion embeddings arrive as tensors in place of ids; the service resolves embeddings by
    name from its own embeddings/ folder, so a tensor here is refused rather than silently dropped.
    """
    out: dict[str, list[list[list[Any]]]] = {}
    for key, chunks in tokens.items():
        wire_chunks = []
        for chunk in chunks:
            pairs = []
            for item in chunk:
                token, weight = item[0], item[1]
                if isinstance(token, torch.Tensor) or not isinstance(token, int):
                    raise LunaStackError(
                        "this prompt uses a textual-inversion embedding loaded by ComfyUI; shared CLIP "
                        "encoding cannot send it. Put the embedding into the stack's embeddings/ folder "
                        "and use a Luna Shared CLIP Encode node (the service tokenizes the text itself)."
                    )
                pairs.append([token, float(weight)])
            wire_chunks.append(pairs)
        out[key] = wire_chunks
    return out


def latent(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """ComfyUI's LATENT: raw (unscaled) [B,C,H/8,W/8]."""
    return {"samples": samples}


def image_to_wire(pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 -> the VAE's input: RGB only (VAEEncode drops alpha), float32."""
    if pixels.ndim != 4:
        raise LunaStackError(f"expected an IMAGE batch [B,H,W,C], got shape {list(pixels.shape)}")
    return pixels[..., :3].float().contiguous()


def conditioning(cond: torch.Tensor, pooled: torch.Tensor, extra: Mapping[str, Any] | None = None) -> list:
    """ComfyUI's CONDITIONING: [[cond [B,T,D], {"pooled_output": [B,P], ...}]]."""
    return [[cond, {"pooled_output": pooled, **(extra or {})}]]


def size_params(values: Mapping[str, Any]) -> dict[str, int]:
    """The SDXL size conditioning present in `values`, as ints."""
    return {k: int(values[k]) for k in SIZE_KEYS if k in values}


def control_to_wire(control: Mapping[str, Sequence[torch.Tensor | None]] | None) -> tuple[dict, dict]:
    """ComfyUI's control dict of lists -> tensors `control.<kind>.<index>` and `control_lengths`.

    ComfyUI pops each list from the end, so the index in the list (None entries omitted) and the list
    length together say which block a residual feeds.
    """
    tensors: dict[str, torch.Tensor] = {}
    lengths: dict[str, int] = {}
    for kind, items in (control or {}).items():
        if kind not in CONTROL_KINDS:
            raise LunaStackError(f"control residuals of kind {kind!r} cannot be sent to the UNet service")
        if not items:
            continue
        lengths[kind] = len(items)
        for index, residual in enumerate(items):
            if residual is not None:
                tensors[f"control.{kind}.{index}"] = residual
    return tensors, lengths
