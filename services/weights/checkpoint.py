"""Checkpoint files: safetensors loading, component detection from keys and shapes, config inference.

Detection looks only at key names and tensor shapes (as ComfyUI's model_detection does), so a real
SDXL file and the small random-weight fixtures go through the same code. Everything here works on
meta tensors too: `load_shapes` reads a file's header only, enough for `detect` and the
`*_config_from_state_dict` functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from luna_stack.weights.ldm_layout import clip_hf_canonical
from luna_stack.wire.errors import ModelLoadError

Tensor = torch.Tensor
Family = Literal["sd15", "sdxl", "flux", "sd3", "unknown"]
ComponentKind = Literal["unet", "vae", "clip_l", "clip_g", "t5xxl"]
# "ldm" for UNet / VAE in the original naming, "diffusers" for diffusers naming,
# "hf" for transformers CLIP naming (`text_model.*`), "openclip" for OpenCLIP (`transformer.resblocks.*`),
# "bfl" for Black Forest Labs' Flux DiT naming (`double_blocks.*`), "sai" for Stability's SD3 MMDiT
# naming (`joint_blocks.*`).
Layout = Literal["ldm", "diffusers", "hf", "openclip", "bfl", "sai"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Real CLIP widths; other widths (the small fixtures) are told apart by CLIP-G's text projection.
_CLIP_L_WIDTH = 768
_CLIP_G_WIDTH = 1280
# Both CLIP text towers use 64-wide attention heads.
_CLIP_HEAD_DIM = 64
# SD1.5 UNets use 8 heads per attention block; SDXL (linear proj_in) uses 64-wide heads.
_SD15_HEADS = 8
_SDXL_HEAD_DIM = 64
# GroupNorm's group count is invisible in the weights; every SD-family UNet and VAE uses 32.
_NORM_GROUPS = 32


# ------------------------------------------------------------------------------------------ loading


def _open(path: Path):
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ModelLoadError(
            f"{path.name}: only safetensors files are loaded",
            hint="convert .ckpt/.pt files to .safetensors; pickled files are never opened",
        )
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path.name}: file not found") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path.name}: not a valid safetensors file", details={"reason": error_reason(exc)}
        ) from exc


def error_reason(exc: Exception) -> str:
    """What went wrong, without the file's host path (an OSError's str() carries it)."""
    return (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else str(exc)


def load_state_dict(path: str | Path, prefix: str | None = None) -> dict[str, Tensor]:
    """All tensors of a safetensors file; with `prefix`, only that component's, prefix stripped.

    Reading through safe_open maps the file, so loading one component of a large checkpoint reads only
    its bytes. A corrupt or truncated file raises ModelLoadError.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            return {
                key[len(prefix or "") :]: f.get_tensor(key)
                for key in f.keys()  # noqa: SIM118 - safe_open is not a Mapping
                if prefix is None or key.startswith(prefix)
            }
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{path.name}: corrupt safetensors data", details={"reason": error_reason(exc)}
            ) from exc


def load_shapes(path: str | Path) -> dict[str, Tensor]:
    """The file's keys as meta tensors (shape and dtype, no data): enough for detection and configs."""
    path = Path(path)
    with _open(path) as f:
        shapes = {}
        for key in f.keys():  # noqa: SIM118
            sliced = f.get_slice(key)
            shapes[key] = torch.empty(sliced.get_shape(), dtype=_DTYPES[sliced.get_dtype()], device="meta")
        return shapes


def component(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The keys under `prefix`, with the prefix stripped ("" keeps every key)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Component:
    kind: ComponentKind
    prefix: str
    layout: Layout


@dataclass(frozen=True)
class CheckpointInfo:
    family: Family
    # "checkpoint" for a single-file model with prefixed components, else the one component's kind
    # (a standalone vae/, clip/ or unet/ file), or "unknown" when nothing was recognised.
    kind: Literal["checkpoint", "unet", "vae", "clip_l", "clip_g", "t5xxl", "unknown"]
    components: tuple[Component, ...]

    def get(self, kind: ComponentKind) -> Component | None:
        return next((c for c in self.components if c.kind == kind), None)

    def require(self, kind: ComponentKind) -> Component:
        found = self.get(kind)
        if found is None:
            have = ", ".join(c.kind for c in self.components) or "nothing recognisable"
            raise ModelLoadError(f"the file has no {kind} weights (it has {have})")
        return found


_UNET_PREFIXES = ("model.diffusion_model.", "")
_VAE_PREFIXES = ("first_stage_model.", "vae.", "")
_CLIP_L_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_CLIP_G_PREFIX = "conditioner.embedders.1.model."
_HF_CLIP_TOKENS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
# SD3 / SD3.5 single files keep their text encoders in HF layout under these prefixes.
_SD3_TEXT = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
_T5_KEYS = (
    "shared.weight",
    "encoder.final_layer_norm.weight",
    "encoder.block.0.layer.0.SelfAttention.q.weight",
)


def _has_prefix(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


# Keys that only the original Flux / SD3 DiTs have (ComfyUI's model_detection looks for the same blocks).
_DIT_MARKERS: tuple[tuple[Layout, tuple[str, ...]], ...] = (
    ("bfl", ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")),
    ("sai", ("joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight")),
)
# The family each diffusion-model layout is (SD UNets are told apart by unet_family).
_DIT_FAMILY: dict[Layout, Family] = {"bfl": "flux", "sai": "sd3"}


def _find_unet(keys: set[str]) -> Component | None:
    for prefix in _UNET_PREFIXES:
        if f"{prefix}input_blocks.0.0.weight" in keys and f"{prefix}out.2.weight" in keys:
            return Component("unet", prefix, "ldm")
        for layout, markers in _DIT_MARKERS:
            if all(f"{prefix}{marker}" in keys for marker in markers):
                return Component("unet", prefix, layout)
    if "conv_in.weight" in keys and _has_prefix(keys, "down_blocks.") and _has_prefix(keys, "mid_block."):
        return Component("unet", "", "diffusers")
    return None


def _find_vae(keys: set[str]) -> Component | None:
    for prefix in _VAE_PREFIXES:
        if f"{prefix}decoder.conv_in.weight" not in keys or f"{prefix}encoder.conv_in.weight" not in keys:
            continue
        if _has_prefix(keys, f"{prefix}decoder.up."):
            return Component("vae", prefix, "ldm")
        if _has_prefix(keys, f"{prefix}decoder.up_blocks."):
            return Component("vae", prefix, "diffusers")
    return None


def clip_kind(sd_hf: Mapping[str, Tensor]) -> Literal["clip_l", "clip_g"]:
    """Tell a standalone HF-layout CLIP-L from CLIP-G: by width (768 / 1280), else by CLIP-G's projection.

    Real ComfyUI clip_l files may carry an identity `text_projection`, but they are 768 wide; the small
    fixtures write CLIP-L without a projection and CLIP-G with one.
    """
    sd_hf = clip_hf_canonical(sd_hf)
    width = sd_hf["text_model.embeddings.token_embedding.weight"].shape[1]
    if width in (_CLIP_L_WIDTH, _CLIP_G_WIDTH):
        return "clip_g" if width == _CLIP_G_WIDTH else "clip_l"
    return "clip_g" if "text_projection.weight" in sd_hf else "clip_l"


def _has_hf_clip(keys: set[str], prefix: str) -> bool:
    # old SD1.x files and transformers >= 5.6 omit the `text_model.` level
    return any(f"{prefix}{name}" in keys for name in _HF_CLIP_TOKENS)


def _find_text_encoders(sd: Mapping[str, Tensor], keys: set[str]) -> list[Component]:
    found = [Component("clip_l", prefix, "hf") for prefix in _CLIP_L_PREFIXES if _has_hf_clip(keys, prefix)]
    for kind, prefix in _SD3_TEXT.items():
        if kind == "t5xxl" and all(f"{prefix}{k}" in keys for k in _T5_KEYS):
            found.append(Component("t5xxl", prefix, "hf"))
        elif kind != "t5xxl" and _has_hf_clip(keys, prefix):
            found.append(Component(kind, prefix, "hf"))  # type: ignore[arg-type]
    if all(k in keys for k in _T5_KEYS):
        found.append(Component("t5xxl", "", "hf"))
    if f"{_CLIP_G_PREFIX}token_embedding.weight" in keys:
        found.append(Component("clip_g", _CLIP_G_PREFIX, "openclip"))
    if _has_hf_clip(keys, ""):
        found.append(Component(clip_kind(sd), "", "hf"))
    elif "token_embedding.weight" in keys and _has_prefix(keys, "transformer.resblocks."):
        found.append(Component("clip_g", "", "openclip"))
    return found


def unet_family(sd_ldm: Mapping[str, Tensor]) -> Family:
    # SDXL: a label embedding for the pooled/size vector and Linear proj_in; SD1.5: neither.
    proj_in = next((v for k, v in sd_ldm.items() if k.endswith(".proj_in.weight")), None)
    has_label = "label_emb.0.0.weight" in sd_ldm
    if proj_in is None:
        return "unknown"
    if has_label and proj_in.ndim == 2:
        return "sdxl"
    if not has_label and proj_in.ndim == 4:
        return "sd15"
    return "unknown"


def detect(state_dict: Mapping[str, Tensor]) -> CheckpointInfo:
    """Which components a state dict holds, under which prefix and naming, and the model family."""
    keys = set(state_dict)
    components: list[Component] = []
    unet = _find_unet(keys)
    if unet:
        components.append(unet)
    vae = _find_vae(keys)
    if vae:
        components.append(vae)
    components.extend(_find_text_encoders(state_dict, keys))

    family: Family = "unknown"
    if unet and unet.layout == "ldm":
        family = unet_family(component(state_dict, unet.prefix))
    elif unet and unet.layout in _DIT_FAMILY:
        family = _DIT_FAMILY[unet.layout]
    elif any(c.prefix.startswith("text_encoders.") for c in components):
        family = "sd3"
    elif any(c.prefix == _CLIP_G_PREFIX for c in components):
        family = "sdxl"
    elif any(c.prefix == _CLIP_L_PREFIXES[0] for c in components):
        family = "sd15"

    if any(c.prefix for c in components):
        kind = "checkpoint"
    elif len(components) == 1:
        kind = components[0].kind
    else:
        kind = "unknown"
    return CheckpointInfo(family=family, kind=kind, components=tuple(components))


# --------------------------------------------------------------------------------- config inference


def _indices(keys: Any, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def _require(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise ModelLoadError(f"not a {what} state dict: {key!r} is missing")
    return sd[key]


def vae_config_from_state_dict(sd_ldm: Mapping[str, Tensor]) -> dict[str, Any]:
    """diffusers AutoencoderKL kwargs from an LDM-named VAE (prefix stripped)."""
    levels = _indices(sd_ldm, r"encoder\.down\.(\d+)\.block\.")
    if not levels:
        raise ModelLoadError("not an LDM VAE state dict: no encoder.down.N blocks")
    latent = _require(sd_ldm, "decoder.conv_in.weight", "VAE").shape[1]
    config: dict[str, Any] = {
        "in_channels": _require(sd_ldm, "encoder.conv_in.weight", "VAE").shape[1],
        "out_channels": _require(sd_ldm, "decoder.conv_out.weight", "VAE").shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [sd_ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels],
        "layers_per_block": len(_indices(sd_ldm, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": latent,
        "norm_num_groups": _NORM_GROUPS,
    }
    if "quant_conv.weight" not in sd_ldm:
        config["use_quant_conv"] = False
    if "post_quant_conv.weight" not in sd_ldm:
        config["use_post_quant_conv"] = False
    if "encoder.mid.attn_1.q.weight" not in sd_ldm:
        config["mid_block_add_attention"] = False
    return config


def unet_config_from_state_dict(sd_ldm: Mapping[str, Tensor]) -> dict[str, Any]:
    """diffusers UNet2DConditionModel kwargs from an LDM-named SD1.5 / SDXL UNet (prefix stripped)."""
    conv_in = _require(sd_ldm, "input_blocks.0.0.weight", "UNet")
    blocks = _indices(sd_ldm, r"input_blocks\.(\d+)\.")[1:]
    # Walk input blocks level by level: resnets (+ attention), closed by a downsampler (`.0.op`).
    levels: list[list[int]] = [[]]
    for i in blocks:
        if f"input_blocks.{i}.0.op.weight" in sd_ldm:
            levels.append([])
        else:
            levels[-1].append(i)
    layers = {len(level) for level in levels}
    if len(layers) != 1:
        raise ModelLoadError("UNet levels have different numbers of resnets; not an SD-family layout")

    attention = [f"input_blocks.{level[0]}.1.proj_in.weight" in sd_ldm for level in levels]
    depth = [
        len(_indices(sd_ldm, rf"input_blocks\.{level[0]}\.1\.transformer_blocks\.(\d+)\.")) if attn else 1
        for level, attn in zip(levels, attention, strict=True)
    ]
    mid_depth = len(_indices(sd_ldm, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth != depth[-1]:
        raise ModelLoadError("UNet middle block depth differs from the last level's; unsupported layout")
    channels = [sd_ldm[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    proj_in = _require(sd_ldm, "middle_block.1.proj_in.weight", "UNet")
    linear = proj_in.ndim == 2
    to_k = sd_ldm["middle_block.1.transformer_blocks.0.attn2.to_k.weight"]

    config: dict[str, Any] = {
        "in_channels": conv_in.shape[1],
        "out_channels": _require(sd_ldm, "out.2.weight", "UNet").shape[0],
        "block_out_channels": channels,
        "layers_per_block": layers.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": depth,
        "cross_attention_dim": to_k.shape[1],
        "attention_head_dim": [c // _SDXL_HEAD_DIM for c in channels] if linear else _SD15_HEADS,
        "use_linear_projection": linear,
        "norm_num_groups": _NORM_GROUPS,
    }
    if "label_emb.0.0.weight" in sd_ldm:
        # ComfyUI hands the UNet the finished `y` vector; a projection class embedding takes it as is.
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = sd_ldm["label_emb.0.0.weight"].shape[1]
    return config


def clip_config_from_state_dict(
    sd_hf: Mapping[str, Tensor], kind: Literal["clip_l", "clip_g"] | None = None
) -> dict[str, Any]:
    """transformers CLIPTextConfig kwargs from HF-named CLIP weights (prefix stripped).

    `kind` (from the checkpoint prefix when known) picks the activation: quick_gelu for CLIP-L, gelu
    for CLIP-G; without it `clip_kind` decides.
    """
    sd_hf = clip_hf_canonical(sd_hf)
    tokens = _require(sd_hf, "text_model.embeddings.token_embedding.weight", "CLIP")
    width = tokens.shape[1]
    projection = sd_hf.get("text_projection.weight")
    kind = kind or clip_kind(sd_hf)
    return {
        "vocab_size": tokens.shape[0],
        "hidden_size": width,
        "intermediate_size": sd_hf["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(sd_hf, r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": max(1, width // _CLIP_HEAD_DIM),
        "max_position_embeddings": sd_hf["text_model.embeddings.position_embedding.weight"].shape[0],
        "projection_dim": projection.shape[0] if projection is not None else width,
        "hidden_act": "gelu" if kind == "clip_g" else "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def t5_config_from_state_dict(sd_hf: Mapping[str, Tensor]) -> dict[str, Any]:
    """transformers T5Config kwargs (encoder only) from HF-named T5 weights (prefix stripped).

    Heads and buckets come from the relative attention bias [buckets, heads]; a gated feed-forward
    (`wi_0` / `wi_1`, T5 v1.1) uses tanh-approximated GELU, the original T5's single `wi` ReLU."""
    tokens = _require(sd_hf, "shared.weight", "T5")
    block = "encoder.block.0.layer."
    bias = _require(sd_hf, f"{block}0.SelfAttention.relative_attention_bias.weight", "T5")
    buckets, heads = bias.shape
    gated = f"{block}1.DenseReluDense.wi_0.weight" in sd_hf
    wi = sd_hf[f"{block}1.DenseReluDense.wi_0.weight" if gated else f"{block}1.DenseReluDense.wi.weight"]
    return {
        "vocab_size": tokens.shape[0],
        "d_model": tokens.shape[1],
        "d_kv": sd_hf[f"{block}0.SelfAttention.q.weight"].shape[0] // heads,
        "d_ff": wi.shape[0],
        "num_layers": len(_indices(sd_hf, r"encoder\.block\.(\d+)\.")),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "dropout_rate": 0.0,
    }
