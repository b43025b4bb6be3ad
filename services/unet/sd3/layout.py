"""SD3 / SD3.5 MMDiT files: the config from key names and shapes, and SAI <-> diffusers key names.

SAI layout (Stability's reference code, ComfyUI's `MMDiT`): `joint_blocks.N.{x_block,context_block}`
with fused `attn.qkv`, `x_embedder.proj`, `pos_embed` [1, max², hidden], `t_embedder.mlp`, `y_embedder.mlp`,
`context_embedder`, `final_layer`. diffusers' SD3Transformer2DModel splits q/k/v and orders the two
halves of the adaLN-continuous modulations (the last block's pre-only context norm, the final layer)
as (scale, shift) where SAI has (shift, scale).

The config follows ComfyUI's detection: width = x_embedder rows, heads of 64 (ComfyUI's fixed head
size), one joint block per `joint_blocks.N`, qk RMS norm where `ln_q` exists (SD3.5), dual attention
in the blocks that have `x_block.attn2` (SD3.5 medium), pos_embed_max_size = sqrt(pos_embed rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from luna_stack.lora.resolve import AliasPart
from luna_stack.weights.precision import QuantizedWeight
from luna_stack.wire.errors import ModelLoadError

HEAD_DIM = 64
Kind = Literal["plain", "qkv", "swap"]  # one tensor / fused rows q,k,v / (shift, scale) <-> (scale, shift)
_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")


def claims_keys(keys: Mapping[str, Any]) -> bool:
    """ComfyUI's test for an MMDiT: a fused context-block qkv in joint block 0 and a patch embedder."""
    return "joint_blocks.0.context_block.attn.qkv.weight" in keys and "x_embedder.proj.weight" in keys


@dataclass(frozen=True)
class Sd3Config:
    """What SD3Transformer2DModel is built from (diffusers' argument names)."""

    in_channels: int
    out_channels: int
    patch_size: int
    num_layers: int
    num_attention_heads: int
    joint_attention_dim: int  # context width (4096: CLIP-L ++ CLIP-G padded ++ T5-XXL)
    pooled_projection_dim: int  # y width (2048: CLIP-L ++ CLIP-G pooled)
    pos_embed_max_size: int  # patches a side
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None  # "rms_norm" (SD3.5)

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * HEAD_DIM

    @property
    def variant(self) -> str:
        """sd3 (SD3 medium), sd3.5-medium (dual attention), sd3.5-large (qk norm only)."""
        if self.dual_attention_layers:
            return "sd3.5-medium"
        return "sd3.5-large" if self.qk_norm else "sd3"

    def diffusers_kwargs(self) -> dict[str, Any]:
        return {
            "sample_size": self.pos_embed_max_size * self.patch_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": HEAD_DIM,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "caption_projection_dim": self.hidden,
            "pooled_projection_dim": self.pooled_projection_dim,
            "pos_embed_max_size": self.pos_embed_max_size,
            "dual_attention_layers": self.dual_attention_layers,
            "qk_norm": self.qk_norm,
        }


def _shape(value: Any) -> torch.Size:
    return torch.Size(value.shape)


def config_from_keys(shapes: Mapping[str, Any]) -> Sd3Config:
    """The MMDiT config of SAI-named tensors (values: anything with `.shape`); ModelLoadError if the
    keys are not a complete MMDiT diffusers can build."""
    try:
        hidden, in_channels, patch, _ = _shape(shapes["x_embedder.proj.weight"])
        final = _shape(shapes["final_layer.linear.weight"])[0]
        ctx_out, ctx_in = _shape(shapes["context_embedder.weight"])
        pooled = _shape(shapes["y_embedder.mlp.0.weight"])[1]
        patches = _shape(shapes["pos_embed"])[1]
    except KeyError as exc:
        raise ModelLoadError(f"not an SD3 MMDiT: no {exc.args[0]}") from None
    if hidden % HEAD_DIM or ctx_out != hidden:
        raise ModelLoadError(f"not an SD3 MMDiT: width {hidden} is not a multiple of {HEAD_DIM} heads")
    max_size = math.isqrt(patches)
    if max_size * max_size != patches:
        raise ModelLoadError(f"SD3 pos_embed has {patches} rows, not a square grid")
    blocks = sorted({int(m[1]) for k in shapes if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise ModelLoadError(f"SD3 joint blocks are not numbered 0..N-1: {blocks[:8]}")
    dual = tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    if qk and _shape(shapes["joint_blocks.0.x_block.attn.ln_q.weight"])[0] != HEAD_DIM:
        raise ModelLoadError(f"SD3 heads are not {HEAD_DIM} wide")
    return Sd3Config(
        in_channels=int(in_channels),
        out_channels=int(final) // (patch * patch),
        patch_size=int(patch),
        num_layers=len(blocks),
        num_attention_heads=int(hidden) // HEAD_DIM,
        joint_attention_dim=int(ctx_in),
        pooled_projection_dim=int(pooled),
        pos_embed_max_size=max_size,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if qk else None,
    )


# ------------------------------------------------------------------------------------------ key map


@dataclass(frozen=True)
class _Entry:
    sai: str  # SAI module path (".weight"/".bias" appended) or the full key for pos_embed
    diffusers: tuple[str, ...]  # three for qkv
    kind: Kind = "plain"


_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def _attention(sai: str, ours: str, qkv: tuple[str, ...], norms: tuple[str, str] | None) -> list[_Entry]:
    entries = [_Entry(f"{sai}.qkv", tuple(f"{ours}.{n}" for n in qkv), "qkv")]
    if norms:
        entries += [_Entry(f"{sai}.ln_{w}", (f"{ours}.{n}",)) for w, n in zip("qk", norms, strict=True)]
    return entries


def _entries(cfg: Sd3Config) -> Iterator[_Entry]:
    yield _Entry("pos_embed", ("pos_embed.pos_embed",))
    yield _Entry("x_embedder.proj", ("pos_embed.proj",))
    for sai, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        yield _Entry(f"{sai}.mlp.0", (f"time_text_embed.{ours}.linear_1",))
        yield _Entry(f"{sai}.mlp.2", (f"time_text_embed.{ours}.linear_2",))
    yield _Entry("context_embedder", ("context_embedder",))
    yield _Entry("final_layer.linear", ("proj_out",))
    yield _Entry("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap")
    qk, added_qk = (("norm_q", "norm_k"), ("norm_added_q", "norm_added_k")) if cfg.qk_norm else (None, None)
    for i in range(cfg.num_layers):
        s, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == cfg.num_layers - 1  # its context block is pre-only: no projection out, no MLP
        yield from _attention(f"{s}.x_block.attn", f"{d}.attn", _QKV, qk)
        yield _Entry(f"{s}.x_block.attn.proj", (f"{d}.attn.to_out.0",))
        yield from _attention(f"{s}.context_block.attn", f"{d}.attn", _ADDED_QKV, added_qk)
        if i in cfg.dual_attention_layers:
            yield from _attention(f"{s}.x_block.attn2", f"{d}.attn2", _QKV, qk)
            yield _Entry(f"{s}.x_block.attn2.proj", (f"{d}.attn2.to_out.0",))
        yield _Entry(f"{s}.x_block.adaLN_modulation.1", (f"{d}.norm1.linear",))
        context_norm = "swap" if last else "plain"  # pre-only: adaLN-continuous, (scale, shift) in diffusers
        yield _Entry(f"{s}.context_block.adaLN_modulation.1", (f"{d}.norm1_context.linear",), context_norm)
        yield _Entry(f"{s}.x_block.mlp.fc1", (f"{d}.ff.net.0.proj",))
        yield _Entry(f"{s}.x_block.mlp.fc2", (f"{d}.ff.net.2",))
        if not last:
            yield _Entry(f"{s}.context_block.attn.proj", (f"{d}.attn.to_add_out",))
            yield _Entry(f"{s}.context_block.mlp.fc1", (f"{d}.ff_context.net.0.proj",))
            yield _Entry(f"{s}.context_block.mlp.fc2", (f"{d}.ff_context.net.2",))


def module_aliases(cfg: Sd3Config) -> dict[str, tuple[AliasPart, ...]]:
    """SAI module path -> the diffusers modules computing its output rows: what `lora_unet_<SAI path>`
    (kohya) and `diffusion_model.<SAI path>` LoRA files name (ComfyUI's SD3 key map reads both)."""
    h = cfg.hidden
    aliases: dict[str, tuple[AliasPart, ...]] = {}
    for entry in _entries(cfg):
        if entry.sai == "pos_embed" or ".ln_" in entry.sai:
            continue  # a buffer and RMSNorm scales: nothing a LoRA adapts
        if entry.kind == "qkv":
            aliases[entry.sai] = tuple(
                AliasPart(d, ((i * h, (i + 1) * h),)) for i, d in enumerate(entry.diffusers)
            )
        elif entry.kind == "swap":  # diffusers' rows are SAI's second half, then its first
            aliases[entry.sai] = (AliasPart(entry.diffusers[0], ((h, 2 * h), (0, h))),)
        else:
            aliases[entry.sai] = (AliasPart(entry.diffusers[0]),)
    return aliases


def _suffixes(entry: _Entry) -> tuple[str, ...]:
    return ("",) if entry.sai == "pos_embed" else (".weight", ".bias")


def _chunk(value: Any, parts: int) -> list[Any]:
    """Equal row blocks along dim 0; GGUF weights stay quantized where rows are whole blocks."""
    step = value.shape[0] // parts
    if isinstance(value, QuantizedWeight):
        pieces = [value.rows(i * step, (i + 1) * step) for i in range(parts)]
        if all(p is not None for p in pieces):
            return pieces
        value = value.dequantize(torch.float32)  # rows cut through blocks: split the values instead
    return list(value.chunk(parts, dim=0))


def _cat(values: list[Any]) -> Any:
    if isinstance(values[0], QuantizedWeight):
        return QuantizedWeight.concat(values)
    return torch.cat(values, dim=0)


def _swap(value: Any) -> Any:
    first, second = _chunk(value, 2)
    return _cat([second, first])


def sai_to_diffusers(sd: Mapping[str, Any], cfg: Sd3Config) -> dict[str, Any]:
    """diffusers names for a whole SAI state dict (values may be GGUF `QuantizedWeight`s: fused rows
    split along whole rows); ModelLoadError on keys the config does not account for."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    for entry in _entries(cfg):
        for suffix in _suffixes(entry):
            key = entry.sai + suffix
            if key not in sd:
                continue  # a missing key surfaces as a missing weight when loading, naming it
            used.add(key)
            value = sd[key]
            if entry.kind == "qkv":
                out.update(zip((d + suffix for d in entry.diffusers), _chunk(value, 3), strict=True))
            else:
                out[entry.diffusers[0] + suffix] = _swap(value) if entry.kind == "swap" else value
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ModelLoadError(f"SD3 MMDiT has tensors this loader does not know: {unknown[:4]}")
    return out


def diffusers_to_sai(sd: Mapping[str, torch.Tensor], cfg: Sd3Config) -> dict[str, torch.Tensor]:
    """SAI names for diffusers-named tensors (any part of the model, as long as each q/k/v triple is
    whole): what the fixture writer and converters write."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in _entries(cfg):
        for suffix in _suffixes(entry):
            names = [d + suffix for d in entry.diffusers]
            present = [n in sd for n in names]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"{entry.sai}{suffix}: only part of {names} given")
            used.update(names)
            values = [sd[n] for n in names]
            value = _cat(values) if entry.kind == "qkv" else values[0]
            out[entry.sai + suffix] = _swap(value) if entry.kind == "swap" else value
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"diffusers tensors without an SAI name: {unknown[:4]}")
    return out
