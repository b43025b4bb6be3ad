"""Flux.1's step, ComfyUI's `diffusion_model(x, timestep, context, y, guidance, control)`, over diffusers'
FluxTransformer2DModel submodules.

What ComfyUI's Flux (comfy/ldm/flux/model.py) does and this forward keeps:
- x [B,C,H,W] is padded to even H, W (circular, as comfy.ldm.common_dit.pad_to_patch_size), cut into
  2x2 patches (tokens of C·4 channels, row-major), and the output cropped back to H x W;
- `timestep` is the sigma in 0..1 and `guidance` the raw scale (3.5); both are multiplied by 1000 in
  float32 before the 256-wide sinusoidal embedding, which is then cast to the compute dtype (diffusers'
  own forward casts the sigma to the compute dtype first: in bf16 that rounds the timestep);
- positions: text tokens (0, 0, 0), image tokens (0, row, column) in patch units; RoPE over both;
- ControlNet residuals [B, n, hidden]: `control.input.<i>` is added to the first n image tokens after
  double block i, `control.output.<i>` after single block i (n <= image tokens);
- fp16: image tokens are cleaned of inf/NaN after the double blocks (ComfyUI's nan_to_num).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

from .layout import PATCH

Tensor = torch.Tensor
_FP16_MAX = 65504.0


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Image tokens per column and row for a latent of height x width (odd sizes padded)."""
    return (height + PATCH - 1) // PATCH, (width + PATCH - 1) // PATCH


def patchify(x: Tensor) -> Tensor:
    """[B,C,H,W] -> [B, tokens, C·2·2]: padded to the patch, channels then patch row then column."""
    pad_h, pad_w = (-x.shape[2]) % PATCH, (-x.shape[3]) % PATCH
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpatchify(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of patchify, cropped to height x width."""
    b, _, d = tokens.shape
    rows, cols = token_grid(height, width)
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, rows, cols, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * PATCH, cols * PATCH)[:, :, :height, :width]


def position_ids(height: int, width: int, context_tokens: int, device: torch.device) -> Tensor:
    """[context tokens + image tokens, 3] RoPE positions: text all zero, image (0, row, column)."""
    rows, cols = token_grid(height, width)
    img = torch.zeros(rows, cols, 3, device=device, dtype=torch.float32)
    img[..., 1] = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
    img[..., 2] = torch.arange(cols, device=device, dtype=torch.float32)[None, :]
    txt = torch.zeros(context_tokens, 3, device=device, dtype=torch.float32)
    return torch.cat([txt, img.reshape(rows * cols, 3)])


def _embed_time(module: FluxTransformer2DModel, t: Tensor, dtype: torch.dtype) -> Tensor:
    return module.time_text_embed.time_proj(t.float() * 1000).to(dtype)


def conditioning(
    module: FluxTransformer2DModel, timesteps: Tensor, y: Tensor, guidance: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """ComfyUI's `vec`: time_in(t) (+ guidance_in(g)) + vector_in(y)."""
    embed = module.time_text_embed
    vec = embed.timestep_embedder(_embed_time(module, timesteps, dtype))
    if guidance is not None:
        vec = vec + embed.guidance_embedder(_embed_time(module, guidance, dtype))
    return vec + embed.text_embedder(y)


def _add_control(img: Tensor, residual: Tensor | None) -> None:
    if residual is not None:
        img[:, : residual.shape[1]] += residual.to(img.dtype)


def flux_forward(
    module: FluxTransformer2DModel,
    x: Tensor,
    timesteps: Tensor,
    context: Tensor,
    y: Tensor,
    guidance: Tensor | None = None,
    control: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """One step; inputs already on the device, x/context/y in the compute dtype, control keyed
    `input.<i>` / `output.<i>`. Returns [B, out channels, H, W] in the compute dtype."""
    control = control or {}
    height, width = x.shape[2:]
    img = module.x_embedder(patchify(x))
    vec = conditioning(module, timesteps, y, guidance, img.dtype)
    txt = module.context_embedder(context)
    pe = module.pos_embed(position_ids(height, width, context.shape[1], x.device))

    for i, block in enumerate(module.transformer_blocks):
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=pe)
        _add_control(img, control.get(f"input.{i}"))
    if img.dtype == torch.float16:
        img = torch.nan_to_num(img, nan=0.0, posinf=_FP16_MAX, neginf=-_FP16_MAX)
    for i, block in enumerate(module.single_transformer_blocks):
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=pe)
        _add_control(img, control.get(f"output.{i}"))

    out = module.proj_out(module.norm_out(img, vec))
    return unpatchify(out, height, width)
