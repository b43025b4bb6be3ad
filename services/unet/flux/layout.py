"""The Flux.1 files people have (Black Forest Labs' layout) and diffusers' FluxTransformer2DModel names.

BFL keys: `img_in`, `txt_in`, `time_in.{in,out}_layer`, `vector_in.*`, `guidance_in.*` (dev only),
`double_blocks.N.{img,txt}_{mod.lin,attn.qkv,attn.proj,attn.norm.{query,key}_norm.scale,mlp.0,mlp.2}`,
`single_blocks.N.{linear1,linear2,modulation.lin,norm.{query,key}_norm.scale}`,
`final_layer.{linear,adaLN_modulation.1}`.

Two things do not map one to one:
- fused projections: `img_attn.qkv` holds diffusers' to_q/to_k/to_v as row blocks, `txt_attn.qkv` the
  add_{q,k,v}_proj, and `single_blocks.N.linear1` to_q/to_k/to_v/proj_mlp;
- `final_layer.adaLN_modulation.1` emits (shift, scale), diffusers' `norm_out.linear` (scale, shift).

Both are written as `AliasPart`s (a diffusers module and the rows of the BFL output it computes), the
same map the weight conversion, the fixture writer and LoRA binding use. diffusers' own converter
hard-codes Flux.1's width (3072), so small files need this one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from luna_stack.lora.resolve import AliasPart
from luna_stack.weights.precision import QuantizedWeight
from luna_stack.wire.errors import ModelLoadError

PATCH = 2  # Flux.1 patchifies latents 2x2: 16 latent channels are 64 token channels
Modules = dict[str, tuple[AliasPart, ...]]


@dataclass(frozen=True)
class FluxConfig:
    """What a Flux.1 file's keys and shapes say about the network."""

    hidden: int
    heads: int
    depth: int  # double-stream blocks
    depth_single: int
    in_channels: int  # token channels: latent channels x 2 x 2
    out_channels: int
    context_dim: int  # T5 width (4096)
    pooled_dim: int  # CLIP-L pooled width (768)
    guidance: bool  # dev: guidance embedding; schnell: none

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """RoPE widths of the (index, row, column) axes: Flux.1's (16, 56, 56) for a head of 128, scaled."""
        first = self.head_dim // 8
        rest = (self.head_dim - first) // 2
        return (first, rest, rest)

    def diffusers_kwargs(self) -> dict[str, Any]:
        return {
            "patch_size": 1,  # diffusers takes pre-patchified tokens (as its pipeline packs latents)
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.context_dim,
            "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance,
            "axes_dims_rope": self.axes_dim,
        }


FLUX1_DEV = FluxConfig(3072, 24, 19, 38, 64, 64, 4096, 768, guidance=True)
FLUX1_SCHNELL = FluxConfig(3072, 24, 19, 38, 64, 64, 4096, 768, guidance=False)

_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight")


def is_flux(keys: Mapping[str, torch.Size]) -> bool:
    """Flux.1 (not Flux.2's global modulation, not Chroma's distilled guidance): ComfyUI's markers."""
    return (
        all(k in keys for k in _MARKERS)
        and "double_blocks.0.img_attn.norm.key_norm.scale" in keys
        and "double_stream_modulation_img.lin.weight" not in keys
        and not any(k.startswith("distilled_guidance_layer.") for k in keys)
    )


def _count(keys: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    found = {int(m[1]) for k in keys if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise ModelLoadError(f"Flux file has gaps in its {prefix.rstrip('.')} ({sorted(found)[:8]}...)")
    return len(found)


def infer_config(shapes: Mapping[str, torch.Size]) -> FluxConfig:
    """The config from key names and shapes (as ComfyUI's model detection reads them)."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp = shapes["double_blocks.0.img_mlp.0.weight"][0]
        config = FluxConfig(
            hidden=int(hidden),
            heads=int(hidden) // int(head_dim),
            depth=_count(shapes, "double_blocks."),
            depth_single=_count(shapes, "single_blocks."),
            in_channels=int(in_channels),
            out_channels=int(shapes["final_layer.linear.weight"][0]),
            context_dim=int(shapes["txt_in.weight"][1]),
            pooled_dim=int(shapes["vector_in.in_layer.weight"][1]),
            guidance="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"not a Flux.1 diffusion model: missing or odd tensor {exc}") from None
    problems = []
    if hidden % head_dim or head_dim % 32:
        problems.append(f"head width {head_dim} (hidden {hidden}) is not a multiple of 32 dividing hidden")
    if mlp != 4 * hidden:
        problems.append(f"MLP ratio {mlp / hidden:g} (diffusers' Flux blocks are built with 4)")
    if in_channels % PATCH**2 or config.out_channels % PATCH**2:
        problems.append(f"{in_channels} input channels are not 2x2 patches of latent channels")
    if "double_blocks.0.img_attn.qkv.bias" not in shapes:
        problems.append("no qkv bias (Flux.1 has one)")
    if problems:
        raise ModelLoadError("unsupported Flux variant: " + "; ".join(problems))
    return config


# ---------------------------------------------------------------------------------------- the map


def _split(module: str, names: tuple[str, ...], widths: tuple[int, ...]) -> tuple[AliasPart, ...]:
    parts, start = [], 0
    for name, width in zip(names, widths, strict=True):
        parts.append(AliasPart(f"{module}{name}", ((start, start + width),)))
        start += width
    return tuple(parts)


def _one(module: str) -> tuple[AliasPart, ...]:
    return (AliasPart(module),)


def module_map(config: FluxConfig) -> Modules:
    """BFL Linear module path -> the diffusers modules that compute its output rows."""
    h = config.hidden
    qkv = ("to_q", "to_k", "to_v")
    embed = "time_text_embed."
    modules: Modules = {
        "img_in": _one("x_embedder"),
        "txt_in": _one("context_embedder"),
        "time_in.in_layer": _one(f"{embed}timestep_embedder.linear_1"),
        "time_in.out_layer": _one(f"{embed}timestep_embedder.linear_2"),
        "vector_in.in_layer": _one(f"{embed}text_embedder.linear_1"),
        "vector_in.out_layer": _one(f"{embed}text_embedder.linear_2"),
        "final_layer.linear": _one("proj_out"),
        "final_layer.adaLN_modulation.1": (AliasPart("norm_out.linear", ((h, 2 * h), (0, h))),),
    }
    if config.guidance:
        modules["guidance_in.in_layer"] = _one(f"{embed}guidance_embedder.linear_1")
        modules["guidance_in.out_layer"] = _one(f"{embed}guidance_embedder.linear_2")
    for i in range(config.depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        modules.update(
            {
                f"{b}img_mod.lin": _one(f"{d}norm1.linear"),
                f"{b}txt_mod.lin": _one(f"{d}norm1_context.linear"),
                f"{b}img_attn.qkv": _split(f"{d}attn.", qkv, (h, h, h)),
                f"{b}txt_attn.qkv": _split(
                    f"{d}attn.", ("add_q_proj", "add_k_proj", "add_v_proj"), (h, h, h)
                ),
                f"{b}img_attn.proj": _one(f"{d}attn.to_out.0"),
                f"{b}txt_attn.proj": _one(f"{d}attn.to_add_out"),
                f"{b}img_mlp.0": _one(f"{d}ff.net.0.proj"),
                f"{b}img_mlp.2": _one(f"{d}ff.net.2"),
                f"{b}txt_mlp.0": _one(f"{d}ff_context.net.0.proj"),
                f"{b}txt_mlp.2": _one(f"{d}ff_context.net.2"),
            }
        )
    for i in range(config.depth_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        linear1 = _split(f"{d}attn.", qkv, (h, h, h))
        linear1 += (AliasPart(f"{d}proj_mlp", ((3 * h, 7 * h),)),)
        modules.update(
            {
                f"{b}linear1": linear1,
                f"{b}linear2": _one(f"{d}proj_out"),
                f"{b}modulation.lin": _one(f"{d}norm.linear"),
            }
        )
    return modules


def norm_map(config: FluxConfig) -> dict[str, str]:
    """BFL RMSNorm scales -> diffusers norm weights (one to one)."""
    names: dict[str, str] = {}
    for i in range(config.depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        for stream, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            names[f"{b}{stream}_attn.norm.query_norm.scale"] = f"{d}{q}.weight"
            names[f"{b}{stream}_attn.norm.key_norm.scale"] = f"{d}{k}.weight"
    for i in range(config.depth_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        names[f"{b}norm.query_norm.scale"] = f"{d}norm_q.weight"
        names[f"{b}norm.key_norm.scale"] = f"{d}norm_k.weight"
    return names


def take_rows(value: Any, rows: tuple[tuple[int, int], ...]) -> tuple[Any, bool]:
    """The rows of a tensor or GGUF weight, slices concatenated; True if a GGUF weight had to be
    dequantized because a slice does not start on a block boundary."""
    if not rows:
        return value, False
    if isinstance(value, QuantizedWeight):
        pieces = [value.rows(a, b) for a, b in rows]
        if all(p is not None for p in pieces):
            return QuantizedWeight.concat(pieces), False  # type: ignore[arg-type]
        value = value.dequantize(torch.float32)
        return torch.cat([value[a:b] for a, b in rows]), True
    return torch.cat([value[a:b] for a, b in rows]) if len(rows) > 1 else value[
        rows[0][0] : rows[0][1]
    ], False


@dataclass
class Converted:
    state_dict: dict[str, Any]
    dequantized: list[str]  # GGUF tensors expanded because their rows split off block boundaries


def bfl_to_diffusers(sd: Mapping[str, Any], config: FluxConfig) -> Converted:
    """A BFL state dict (prefix stripped; tensors or GGUF weights) in diffusers' names."""
    modules, norms = module_map(config), norm_map(config)
    out: dict[str, Any] = {}
    dequantized: list[str] = []
    for key, value in sd.items():
        if key in norms:
            out[norms[key]] = value
            continue
        module, _, param = key.rpartition(".")
        if module not in modules or param not in ("weight", "bias"):
            raise ModelLoadError(f"Flux file has a tensor this network does not: {key}")
        for part in modules[module]:
            taken, expanded = take_rows(value, part.rows)
            out[f"{part.module}.{param}"] = taken
            if expanded:
                dequantized.append(key)
    return Converted(out, sorted(set(dequantized)))


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """The inverse, for whole groups: every part of a fused BFL tensor must be in `sd`."""
    out: dict[str, torch.Tensor] = {}
    for bfl, diffusers in norm_map(config).items():
        if diffusers in sd:
            out[bfl] = sd[diffusers]
    for module, parts in module_map(config).items():
        for param in ("weight", "bias"):
            names = [f"{p.module}.{param}" for p in parts]
            if not all(n in sd for n in names):
                continue
            pieces: list[tuple[int, torch.Tensor]] = []
            for part, name in zip(parts, names, strict=True):
                tensor, offset = sd[name], 0
                for a, b in part.rows or ((0, tensor.shape[0]),):
                    pieces.append((a, tensor[offset : offset + b - a]))
                    offset += b - a
            out[f"{module}.{param}"] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])])
    return out
