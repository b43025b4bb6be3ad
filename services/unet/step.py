"""One sampling step, called the way ComfyUI calls its diffusion model.

ComfyUI: `diffusion_model(x, timesteps, context, y=None, control=None, transformer_options={})`.
`control` is a dict of lists (`input`, `middle`, `output`) consumed from the END of each list with
`pop()` (ComfyUI's `apply_control`):

- `input`: after input block i (0 = conv_in), the next popped entry is added to h (and so to its skip);
  T2I-Adapters send this list reversed, with None for blocks they skip.
- `middle`: one pop after the middle block.
- `output`: when output block j pops its skip (the output of input block n-1-j), the next popped entry
  is added to that skip. A ControlNet sends its zero-conv outputs here in input-block order, so
  `output[k]` lands on input block k's skip: diffusers' `down_block_additional_residuals`.

On the wire each non-None entry is a tensor named `control.<kind>.<index in ComfyUI's list>`, and the
list lengths (which decide what pops first) travel in params `control_lengths`; a length defaults to
the highest index sent + 1. `from_wire` turns that into residuals keyed by the block they modify.

The forward below walks diffusers' UNet2DConditionModel submodules in LDM block order so each input
block's output is reachable (diffusers' own forward only exposes T2I residuals per level).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from luna_stack.wire.contract import CONTROL_KINDS
from luna_stack.wire.errors import BadRequest, InvalidTensor

_CONTROL_NAME = re.compile(r"control\.(input|middle|output)\.(\d+)")


@dataclass
class BlockResiduals:
    """Control residuals by the block they are added to (what ComfyUI's pops resolve to)."""

    input: dict[int, torch.Tensor] = field(default_factory=dict)  # input block index -> residual
    middle: torch.Tensor | None = None
    output: dict[int, torch.Tensor] = field(default_factory=dict)  # skip of input block index -> residual

    def __bool__(self) -> bool:
        return bool(self.input or self.output) or self.middle is not None

    def named(self) -> dict[str, torch.Tensor]:
        """Residuals as `slot -> tensor` (slots: `input.i`, `middle`, `skip.i`); batching keys on these."""
        out = {f"input.{i}": t for i, t in self.input.items()}
        out.update({f"skip.{i}": t for i, t in self.output.items()})
        if self.middle is not None:
            out["middle"] = self.middle
        return out

    @classmethod
    def from_named(cls, named: Mapping[str, torch.Tensor]) -> BlockResiduals:
        res = cls()
        for slot, t in named.items():
            kind, _, index = slot.partition(".")
            if kind == "middle":
                res.middle = t
            else:
                (res.input if kind == "input" else res.output)[int(index)] = t
        return res


def control_from_wire(
    tensors: Mapping[str, torch.Tensor], lengths: Mapping[str, int] | None, num_input_blocks: int
) -> BlockResiduals:
    """Map `control.<kind>.<index>` tensors onto blocks exactly as ComfyUI's pops would."""
    lists: dict[str, dict[int, torch.Tensor]] = {k: {} for k in CONTROL_KINDS}
    for name, t in tensors.items():
        m = _CONTROL_NAME.fullmatch(name)
        if m:
            lists[m[1]][int(m[2])] = t
        elif name.startswith("control"):
            raise BadRequest(
                f"tensor {name!r}: control residuals are named control.input.N, control.middle.N or "
                "control.output.N (N = index in ComfyUI's control list)"
            )
    lengths = dict(lengths or {})
    unknown = set(lengths) - set(CONTROL_KINDS)
    if unknown:
        raise BadRequest(f"control_lengths has unknown kinds {sorted(unknown)}", hint="input, middle, output")
    res = BlockResiduals()
    for kind, entries in lists.items():
        if not entries:
            continue
        last = max(entries)
        length = lengths.get(kind, last + 1)
        if not isinstance(length, int) or length <= last:
            raise BadRequest(f"control_lengths[{kind!r}] = {length!r}, but control.{kind}.{last} was sent")
        if kind == "middle":
            # One pop: only the list's last entry is ever applied.
            res.middle = entries.get(length - 1)
            continue
        for index, t in entries.items():
            pops = length - 1 - index  # entries popped before this one
            if pops >= num_input_blocks:
                continue  # never reached by ComfyUI's pops either
            block = pops if kind == "input" else num_input_blocks - 1 - pops
            (res.input if kind == "input" else res.output)[block] = t
    return res


def input_block_shapes(unet: UNet2DConditionModel, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of every LDM input block's output for a latent of height x width."""
    cfg = unet.config
    shapes = [(cfg.block_out_channels[0], height, width)]
    for level, block in enumerate(unet.down_blocks):
        channels = cfg.block_out_channels[level]
        shapes += [(channels, height, width)] * len(block.resnets)
        if block.downsamplers:
            height, width = (height + 1) // 2, (width + 1) // 2  # stride-2 conv, padding 1
            shapes.append((channels, height, width))
    return shapes


def check_control(unet: UNet2DConditionModel, control: BlockResiduals, x: torch.Tensor) -> BlockResiduals:
    """Every residual must match the activation it is added to (ComfyUI would only log and skip). A
    residual of one row is added to every row, as ComfyUI's `h += residual` broadcasts it (T2I-Adapters
    send one row for a cond + uncond batch); it comes back expanded to x's rows, so batches can merge."""
    rows = x.shape[0]
    shapes = input_block_shapes(unet, x.shape[2], x.shape[3])
    expected = {f"input.{i}": s for i, s in enumerate(shapes)}
    expected.update({f"skip.{i}": s for i, s in enumerate(shapes)})
    expected["middle"] = shapes[-1]  # the last level has no downsampler: same shape as the middle block
    checked = {}
    for slot, t in control.named().items():
        want = [rows, *expected[slot]]
        if list(t.shape) != want and list(t.shape) != [1, *expected[slot]]:
            raise InvalidTensor(
                f"control residual for {slot} has shape {list(t.shape)}, expected {want} (or 1 row)"
            )
        checked[slot] = t.expand(want)
    return BlockResiduals.from_named(checked)


def _add(h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return h if residual is None else h + residual.to(h.dtype)


def unet_forward(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    y: torch.Tensor | None = None,
    control: BlockResiduals | None = None,
) -> torch.Tensor:
    """ComfyUI's UNetModel forward over diffusers modules; inputs already in the compute dtype/device."""
    control = control or BlockResiduals()
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=timesteps))
    if unet.class_embedding is not None:
        if y is None:
            raise BadRequest("this model needs `y` (SDXL: pooled text embedding ++ size embeddings)")
        emb = emb + unet.get_class_embed(sample=x, class_labels=y)

    h = _add(unet.conv_in(x), control.input.get(0))
    skips = [h]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            h = resnet(h, emb)
            if attentions is not None:
                h = attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
            h = _add(h, control.input.get(len(skips)))
            skips.append(h)
        for downsampler in block.downsamplers or []:
            h = _add(downsampler(h), control.input.get(len(skips)))
            skips.append(h)

    h = _add(unet.mid_block(h, emb, encoder_hidden_states=context), control.middle)
    skips = [_add(s, control.output.get(i)) for i, s in enumerate(skips)]

    # Latent sizes not divisible by the total upsampling: upsample to each skip's size (as diffusers and
    # ComfyUI's output_shape do); otherwise plain 2x, exactly as diffusers' own forward.
    odd = any(d % 2**unet.num_upsamplers for d in x.shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        size = skips[-1].shape[2:] if odd and i < len(unet.up_blocks) - 1 else None
        kwargs = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **kwargs)

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
