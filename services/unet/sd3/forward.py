"""One MMDiT step the way ComfyUI computes it, over diffusers' SD3Transformer2DModel submodules.

ComfyUI's `OpenAISignatureMMDITWrapper(x, timesteps, context, y, control)` (comfy/ldm/modules/
diffusionmodules/mmdit.py), which diffusers' own forward differs from in three places:

- x of an odd size is padded to the 2×2 patch (circular padding) and the output cropped back;
- the positional embedding is the centre crop of the learned max×max table for the padded size;
- `control["output"][i]` (a ControlNet's residual in token space, [B, tokens, hidden]) is added to the
  image tokens after joint block i — the last, pre-only block included; diffusers skips it there.

`timesteps` are ComfyUI's sigma × 1000 (ModelSamplingDiscreteFlow's multiplier), the scale diffusers'
time embedding expects too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

Tensor = torch.Tensor


def patches(size: int, patch: int) -> int:
    """Patches along a side of `size` latent pixels (padded up to whole patches)."""
    return -(-size // patch)


def mmdit_forward(
    model: SD3Transformer2DModel,
    x: Tensor,
    timesteps: Tensor,
    context: Tensor,
    y: Tensor,
    control: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """Inputs already in the compute dtype and device; `control`: block index -> token residual."""
    p = model.config.patch_size
    height, width = x.shape[-2:]
    padded = F.pad(x, (0, (-width) % p, 0, (-height) % p), mode="circular")
    tokens = model.pos_embed(padded)  # patch projection + centre crop of the position table
    temb = model.time_text_embed(timesteps, y)
    ctx = model.context_embedder(context)
    for i, block in enumerate(model.transformer_blocks):
        ctx, tokens = block(hidden_states=tokens, encoder_hidden_states=ctx, temb=temb)
        if control and i in control:
            tokens = tokens + control[i].to(tokens.dtype)
    tokens = model.proj_out(model.norm_out(tokens, temb))
    rows, c = tokens.shape[0], model.out_channels
    hp, wp = padded.shape[-2] // p, padded.shape[-1] // p
    out = tokens.reshape(rows, hp, wp, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(rows, c, hp * p, wp * p)
    return out[:, :, :height, :width]
