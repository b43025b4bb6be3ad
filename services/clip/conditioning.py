"""Token chunks -> (cond, pooled), with ComfyUI's semantics, for a batch of requests in one forward.

Per encoder (comfy/sd1_clip.py ClipTokenWeightEncoder, comfy/sdxl_clip.py):
- the layer: SD1.5 defaults to the last layer (final layer norm applied); CLIPSetLastLayer's -n picks
  layer -n, still through the final layer norm. SDXL defaults to -2 for CLIP-L and CLIP-G, without the
  final layer norm. A clip skip beyond the depth falls back to the last layer.
- weights: if any weight of the request differs from 1, the empty prompt is encoded alongside and each
  weighted token becomes `(z - z_empty) * w + z_empty`; tokens of weight 1 are left untouched.
- chunks are concatenated along tokens; pooled comes from the first chunk's first EOS: projected for
  CLIP-G, unprojected for SD1.5's CLIP-L.
SDXL conditioning is CLIP-L ++ CLIP-G per token, cut to the shorter of the two; pooled is CLIP-G's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from luna_stack.lora.stack import NO_LORA, LoraStack
from luna_stack.wire.errors import BadRequest

from .encoders import ClipEncoder, ForwardOutput, to_device
from .tokenize import Chunk, empty_ids

# (encoder, per-row LoRA stack keys) -> context in which the encoder's forward applies them
LoraContext = Callable[[ClipEncoder, Sequence[LoraStack]], AbstractContextManager[None]]
# (encoder, input embeddings, layers to keep, per-row LoRA stack keys) -> the encoder's outputs; the
# service's runs captured graphs (encoder_graphs.py). Outputs may be static buffers: used before the next.
Forward = Callable[[ClipEncoder, torch.Tensor, frozenset[int], Sequence[LoraStack]], ForwardOutput]


@dataclass(frozen=True)
class Layer:
    index: int | None  # 0-based encoder layer; None = last layer after the final layer norm
    norm: bool  # apply the final layer norm to an intermediate layer


def choose_layer(family: str, clip_skip: int | None, num_layers: int) -> Layer:
    if clip_skip is not None and (clip_skip >= 0 or isinstance(clip_skip, bool)):
        raise BadRequest(
            f"clip_skip must be a negative layer index (got {clip_skip!r})",
            hint="ComfyUI's CLIPSetLastLayer: -1 = last layer, -2 = penultimate (A1111 'clip skip 2')",
        )
    if clip_skip is None:
        clip_skip = -2 if family == "sdxl" else None
    if clip_skip is None or -clip_skip > num_layers:
        return Layer(None, True)
    return Layer(num_layers + clip_skip, norm=family != "sdxl")


@dataclass
class EncodeJob:
    """One request: chunks per encoder key ("l", "g"), layer choice, LoRA stack."""

    chunks: dict[str, list[Chunk]]
    clip_skip: int | None = None
    lora: LoraStack = NO_LORA


def _weighted(chunks: list[Chunk]) -> bool:
    return any(w != 1.0 for chunk in chunks for _, w in chunk)


def encode_rows(
    encoder: ClipEncoder,
    family: str,
    jobs: Sequence[EncodeJob],
    lora_context: LoraContext | None,
    forward: Forward | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(z [1, 77*k, width] float32, pooled [1, P] float32) per job for one encoder, in one forward."""
    rows: list[Chunk] = []
    row_lora: list[LoraStack] = []
    first_row: list[int] = []
    empty_row: dict[tuple[LoraStack, int], int] = {}
    for job in jobs:
        chunks = job.chunks[encoder.kind]
        first_row.append(len(rows))
        rows.extend(chunks)
        row_lora.extend([job.lora] * len(chunks))
    for job in jobs:
        chunks = job.chunks[encoder.kind]
        if _weighted(chunks):
            length = max(len(c) for c in chunks)
            if (job.lora, length) not in empty_row:
                empty_row[(job.lora, length)] = len(rows)
                rows.append([(t, 1.0) for t in empty_ids(encoder.spec, length)])
                row_lora.append(job.lora)
    layers = [choose_layer(family, job.clip_skip, encoder.num_layers) for job in jobs]
    embeds, pool_at = encoder.embed(rows)
    keep = frozenset(layer.index for layer in layers if layer.index is not None)
    if forward is not None:
        out = forward(encoder, embeds, keep, row_lora)
    else:
        with _lora(lora_context, encoder, row_lora):
            out = encoder.forward(embeds, keep)
    results = []
    for job, layer, start in zip(jobs, layers, first_row, strict=True):
        chunks = job.chunks[encoder.kind]
        z = _select(encoder, out.final, out.hidden, layer, slice(start, start + len(chunks))).float()
        if _weighted(chunks):
            empty_at = empty_row[(job.lora, max(len(c) for c in chunks))]
            z_empty = _select(encoder, out.final, out.hidden, layer, slice(empty_at, empty_at + 1)).float()[0]
            w = to_device(torch.tensor([[w for _, w in chunk] for chunk in chunks]), z.device).unsqueeze(-1)
            z = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
        pooled = out.final[start : start + 1, pool_at[start]]
        if encoder.kind == "g":
            # One row at a time: a GEMM's rounding may depend on its row count, and a request's pooled
            # output must not depend on what it was batched with.
            with _lora(lora_context, encoder, [job.lora]):
                pooled = encoder.project(pooled)
        # Own copies: views would keep the whole batch alive and share storage with each other.
        results.append((z.reshape(1, -1, z.shape[-1]).clone(), pooled.float().clone()))
    return results


def _lora(
    lora_context: LoraContext | None, encoder: ClipEncoder, row_lora: Sequence[LoraStack]
) -> AbstractContextManager[None]:
    return lora_context(encoder, row_lora) if lora_context is not None else contextlib.nullcontext()


def _select(
    encoder: ClipEncoder, final: torch.Tensor, hidden: dict[int, torch.Tensor], layer: Layer, rows: slice
) -> torch.Tensor:
    if layer.index is None:
        return final[rows]
    z = hidden[layer.index][rows]
    return encoder.text.final_layer_norm(z) if layer.norm else z


def encode_jobs(
    encoders: dict[str, ClipEncoder],
    family: str,
    jobs: Sequence[EncodeJob],
    lora_context: LoraContext | None = None,
    forward: Forward | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cond, pooled) per job: SD1.5 = CLIP-L; SDXL = CLIP-L ++ CLIP-G with CLIP-G's pooled."""
    per_encoder = {
        key: encode_rows(enc, family, jobs, lora_context, forward) for key, enc in encoders.items()
    }
    if family != "sdxl":
        return per_encoder["l"]
    results = []
    for (l_z, _), (g_z, g_pooled) in zip(per_encoder["l"], per_encoder["g"], strict=True):
        cut = min(l_z.shape[1], g_z.shape[1])
        results.append((torch.cat([l_z[:, :cut], g_z[:, :cut]], dim=-1), g_pooled))
    return results
