"""Flux and SD3 conditioning from CLIP-L / CLIP-G chunks and the T5-XXL sequence, as ComfyUI builds it.

T5 (comfy/text_encoders/sd3_clip.py T5XXLModel through sd1_clip.ClipTokenWeightEncoder): one sequence
per request, the last layer after the final layer norm (CLIPSetLastLayer's -n reaches T5 too: block -n,
through the final norm; deeper than the stack = last); weights as for CLIP, against the empty sequence
`</s>` + pad of the same length; no pooled output; no attention mask, so padding takes part in the
attention and a row's output depends on its length: only rows of one length share a forward.

- Flux (comfy/text_encoders/flux.py FluxClipModel): cond = T5's output; pooled = CLIP-L's unprojected
  pooled output (CLIP-L with SD1.5's layer rules: last layer by default).
- SD3 (sd3_clip.py SD3ClipModel): CLIP-L and CLIP-G at the penultimate layer without the final norm,
  concatenated per token (cut to the shorter), zero-padded on the right to 4096 wide (or, with small
  test encoders, to T5's width), then T5's sequence appended along the tokens; pooled = CLIP-L pooled ++
  CLIP-G projected pooled. A missing CLIP-L gives 768 zero columns on the left and a 768-wide zero pooled
  part, a missing CLIP-G a 1280-wide zero pooled part; no CLIP at all = T5 alone with 2048 zeros pooled;
  no T5 = the padded CLIP part alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from luna_stack.lora.stack import LoraStack
from luna_stack.wire.errors import BadRequest

from .conditioning import EncodeJob, Forward, LoraContext, _lora, choose_layer, encode_rows
from .encoders import ForwardOutput, to_device
from .t5_encoder import T5Encoder
from .t5_tokenize import END, PAD
from .tokenize import Chunk

if TYPE_CHECKING:
    from .models import ClipModel

SD3_WIDTH = 4096
SD3_L_WIDTH = 768  # ComfyUI's fixed sizes for a missing encoder's zeros
SD3_G_WIDTH = 1280


def widths(model: ClipModel, family: str) -> tuple[int, int]:
    """(cond width, pooled width) of `family` conditioning from this model's encoders."""
    clips = model.clips
    if family == "flux":
        t5 = model.t5
        assert t5 is not None
        return t5.width, clips["l"].width
    if family != "sd3":
        pooled = clips["g"].projection.out_features if "g" in clips and clips["g"].projection else None
        return sum(e.width for e in clips.values()), pooled or clips["l"].width
    l_width = clips["l"].width if "l" in clips else SD3_L_WIDTH
    projection = clips["g"].projection if "g" in clips else None
    g_width = projection.out_features if projection is not None else SD3_G_WIDTH
    t5 = model.t5
    return (t5.width if t5 is not None else SD3_WIDTH), l_width + g_width


def check_sd3(model: ClipModel) -> None:
    """Refuse an SD3 encoder set whose CLIP part is wider than the conditioning (mismatched encoders)."""
    clips = model.clips
    if not clips:
        return
    lg = (clips["l"].width if "l" in clips else SD3_L_WIDTH) + (clips["g"].width if "g" in clips else 0)
    width, _ = widths(model, "sd3")
    if lg > width:
        raise BadRequest(
            f"model {model.name!r}: its CLIP conditioning is {lg} wide, wider than T5's {width}",
            hint="SD3 conditioning needs encoders of matching sizes (CLIP-L 768, CLIP-G 1280, T5-XXL 4096)",
        )


def clip_layer_family(family: str) -> str:
    """The CLIP layer rules (conditioning.choose_layer) a family's CLIP encoders follow in ComfyUI:
    Flux's CLIP-L is SD1.5's, SD3's CLIP-L / CLIP-G are SDXL's."""
    return {"flux": "sd15", "sd3": "sdxl"}.get(family, family)


def empty_t5(length: int) -> Chunk:
    return [(END, 1.0)] + [(PAD, 1.0)] * (length - 1)


def encode_t5(
    encoder: T5Encoder, jobs: Sequence[EncodeJob], lora_context: LoraContext | None
) -> list[torch.Tensor]:
    """T5 conditioning [1, length, width] float32 per job; one forward per sequence length."""
    results: list[torch.Tensor | None] = [None] * len(jobs)
    by_length: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_length.setdefault(len(job.chunks["t5xxl"][0]), []).append(i)
    for length, members in by_length.items():
        rows: list[Chunk] = [jobs[i].chunks["t5xxl"][0] for i in members]
        row_lora: list[LoraStack] = [jobs[i].lora for i in members]
        empty_row: dict[LoraStack, int] = {}
        for i in members:
            job = jobs[i]
            if _weighted(job.chunks["t5xxl"][0]) and job.lora not in empty_row:
                empty_row[job.lora] = len(rows)
                rows.append(empty_t5(length))
                row_lora.append(job.lora)
        layers = [choose_layer("sd15", jobs[i].clip_skip, encoder.num_layers) for i in members]
        # The last block through the final norm is the final output itself.
        index = [None if x.index in (None, encoder.num_layers - 1) else x.index for x in layers]
        with _lora(lora_context, encoder, row_lora):  # type: ignore[arg-type]
            out = encoder.forward(encoder.embed(rows), {i for i in index if i is not None})
        for row, (i, layer) in enumerate(zip(members, index, strict=True)):
            job = jobs[i]
            z = _pick(encoder, out, layer, row)
            chunk = job.chunks["t5xxl"][0]
            if _weighted(chunk):
                z_empty = _pick(encoder, out, layer, empty_row[job.lora])
                w = to_device(torch.tensor([w for _, w in chunk]), z.device).unsqueeze(-1)
                z = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
            results[i] = z.unsqueeze(0).clone()
    return [r for r in results if r is not None]


def _pick(encoder: T5Encoder, out: ForwardOutput, layer: int | None, row: int) -> torch.Tensor:
    """One row's output: the final norm, or block `layer`'s output through the final norm."""
    z = out.final[row] if layer is None else encoder.final_norm(out.hidden[layer][row])
    return z.float()


def _weighted(chunk: Chunk) -> bool:
    return any(w != 1.0 for _, w in chunk)


def encode_t5_jobs(
    model: ClipModel,
    family: str,
    jobs: Sequence[EncodeJob],
    lora_context: LoraContext | None = None,
    forward: Forward | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cond, pooled) per job for a Flux or SD3 request batch."""
    layers = clip_layer_family(family)
    clip = {k: encode_rows(e, layers, jobs, lora_context, forward) for k, e in model.clips.items()}
    t5 = encode_t5(model.t5, jobs, lora_context) if model.t5 is not None else None
    if family == "flux":
        assert t5 is not None
        return [(t5[i], clip["l"][i][1]) for i in range(len(jobs))]
    width, _ = widths(model, "sd3")
    results = []
    for i in range(len(jobs)):
        lg, pooled = _sd3_clip_part(clip, i, width)
        if t5 is None:
            cond = lg if lg is not None else torch.zeros(1, 77, width)
        else:
            cond = torch.cat([lg, t5[i]], dim=-2) if lg is not None else t5[i]
        results.append((cond, pooled))
    return results


def _sd3_clip_part(
    clip: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], i: int, width: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """CLIP-L ++ CLIP-G padded to `width` (None without CLIP) and the pooled L ++ G, with ComfyUI's zeros."""
    l_z, l_pooled = clip["l"][i] if "l" in clip else (None, torch.zeros(1, SD3_L_WIDTH))
    g_z, g_pooled = clip["g"][i] if "g" in clip else (None, torch.zeros(1, SD3_G_WIDTH))
    if l_z is not None and g_z is not None:
        cut = min(l_z.shape[1], g_z.shape[1])
        lg = torch.cat([l_z[:, :cut], g_z[:, :cut]], dim=-1)
    elif g_z is not None:
        lg = F.pad(g_z, (SD3_L_WIDTH, 0))
    else:
        lg = l_z
    pooled = torch.cat([l_pooled.to(g_pooled.device), g_pooled], dim=-1)
    if lg is None:
        return None, pooled
    return F.pad(lg, (0, width - lg.shape[-1])), pooled
