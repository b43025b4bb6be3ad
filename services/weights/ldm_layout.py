"""Key layouts: diffusers / transformers naming <-> the original LDM / OpenCLIP naming of user files.

ComfyUI users' files name weights the way the original Stable Diffusion code did (`input_blocks.4.1...`,
`encoder.down.0.block.0...`, OpenCLIP `resblocks.N.attn.in_proj_weight`); the models we run are
diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' CLIP. Each direction is written
once, as a key translator from diffusers names to LDM names; the reverse map is the inverse of that
translator over the full key set of the model built (on the meta device, no memory) from its config,
so both directions always agree and a missing or stray key is reported instead of silently dropped.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from luna_stack.wire.errors import ModelLoadError

Tensor = torch.Tensor
_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rules(*pairs: tuple[str, Callable[[re.Match[str]], str]]) -> list[_Rule]:
    return [(re.compile(pattern), build) for pattern, build in pairs]


def _translate(key: str, rules: list[_Rule]) -> str:
    for pattern, build in rules:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    raise KeyError(f"no LDM name for {key!r}")


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, default=list)


def _invert(
    sd: Mapping[str, Tensor], to_ldm: Mapping[str, str], shapes: Mapping[str, torch.Size], what: str
) -> dict[str, Tensor]:
    """Rename LDM keys to diffusers keys; reshape where only the layout differs (1x1 conv vs linear)."""
    from_ldm = {ldm: name for name, ldm in to_ldm.items()}
    missing = sorted(set(from_ldm) - set(sd))
    unexpected = sorted(set(sd) - set(from_ldm))
    if missing or unexpected:
        raise ModelLoadError(
            f"{what} weights do not match the architecture inferred from them",
            hint="the file is incomplete or not an SD1.5/SDXL-family model",
            details={"missing": missing[:10], "unexpected": unexpected[:10]},
        )
    out: dict[str, Tensor] = {}
    for ldm_key, tensor in sd.items():
        name = from_ldm[ldm_key]
        shape = shapes[name]
        out[name] = tensor if tensor.shape == shape else tensor.reshape(shape)
    return out


# --------------------------------------------------------------------------------------------- VAE

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_NAMESPACES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@functools.lru_cache(maxsize=8)
def _vae_rules(num_blocks: int) -> list[_Rule]:
    def up(index: str) -> int:  # LDM numbers decoder levels from the lowest resolution up
        return num_blocks - 1 - int(index)

    return _rules(
        (r"(encoder|decoder)\.conv_norm_out\.(\w+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"decoder.up.{up(m[1])}.block.{m[2]}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
            lambda m: f"decoder.up.{up(m[1])}.upsample.conv.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)",
            lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}",
        ),
        (r"(?:encoder|decoder)\.(?:conv_in|conv_out)\.\w+|(?:post_)?quant_conv\.\w+", lambda m: m[0]),
    )


def _vae_num_blocks(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m[1]) for key in sd if (m := re.match(pattern, key))}
    if not found:
        raise ModelLoadError("not a VAE state dict: no encoder down blocks found")
    return max(found) + 1


def vae_diffusers_to_ldm(sd: Mapping[str, Tensor], num_blocks: int | None = None) -> dict[str, Tensor]:
    """diffusers AutoencoderKL names -> LDM names; mid attention linears become [C, C, 1, 1] convs.

    `num_blocks` (len(block_out_channels)) is counted from the keys when not given; pass it when `sd` is
    only part of a VAE.
    """
    blocks = num_blocks or _vae_num_blocks(sd, r"encoder\.down_blocks\.(\d+)\.")
    rules = _vae_rules(blocks)
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        ldm_key = _translate(key, rules)
        is_attn_linear = ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2
        out[ldm_key] = tensor[:, :, None, None] if is_attn_linear else tensor
    return out


@functools.lru_cache(maxsize=8)
def _vae_layout(config_key: str) -> tuple[dict[str, str], dict[str, torch.Size]]:
    from diffusers import AutoencoderKL

    config = json.loads(config_key)
    with torch.device("meta"):
        sd = AutoencoderKL(**config).state_dict()
    rules = _vae_rules(len(config["block_out_channels"]))
    return {k: _translate(k, rules) for k in sd}, {k: v.shape for k, v in sd.items()}


def vae_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Every diffusers AutoencoderKL key of `config` -> its LDM key."""
    return dict(_vae_layout(_config_key(config))[0])


def vae_ldm_to_diffusers(sd_ldm: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """LDM VAE weights (prefix stripped) -> a state dict `AutoencoderKL(**config)` loads strictly.

    Keys outside the VAE's namespaces (e.g. a training file's `loss.*`) are ignored.
    """
    to_ldm, shapes = _vae_layout(_config_key(config))
    vae = {k: v for k, v in sd_ldm.items() if k.startswith(_VAE_NAMESPACES)}
    return _invert(vae, to_ldm, shapes, "VAE")


# -------------------------------------------------------------------------------------------- UNet

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_EMBED = {"linear_1": "0", "linear_2": "2"}


@functools.lru_cache(maxsize=8)
def _unet_rules(layers_per_block: int, up_has_attention: tuple[bool, ...]) -> list[_Rule]:
    # LDM numbers input/output blocks flat: each level holds layers_per_block (+1 on the way up)
    # resnets, and its down/upsampler takes the next slot; input_blocks.0 is conv_in.
    stride = layers_per_block + 1

    def inp(level: str, j: str | int) -> int:
        return 1 + int(level) * stride + int(j)

    def outp(level: str, j: str | int) -> int:
        return int(level) * stride + int(j)

    def upsampler(level: str) -> str:  # after the resnet (.0) and, if the level has one, attention (.1)
        return "2" if up_has_attention[int(level)] else "1"

    return _rules(
        (r"conv_in\.(\w+)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"time_embedding\.(linear_[12])\.(\w+)", lambda m: f"time_embed.{_UNET_EMBED[m[1]]}.{m[2]}"),
        (
            r"(?:class|add)_embedding\.(linear_[12])\.(\w+)",
            lambda m: f"label_emb.0.{_UNET_EMBED[m[1]]}.{m[2]}",
        ),
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"input_blocks.{inp(m[1], m[2])}.0.{_UNET_RESNET[m[3]]}.{m[4]}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{inp(m[1], m[2])}.1.{m[3]}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
            lambda m: f"input_blocks.{inp(m[1], layers_per_block)}.0.op.{m[2]}",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{m[3]}",
        ),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"output_blocks.{outp(m[1], m[2])}.0.{_UNET_RESNET[m[3]]}.{m[4]}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{outp(m[1], m[2])}.1.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
            lambda m: f"output_blocks.{outp(m[1], layers_per_block)}.{upsampler(m[1])}.conv.{m[2]}",
        ),
        (r"conv_norm_out\.(\w+)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(\w+)", lambda m: f"out.2.{m[1]}"),
    )


def _unet_rules_for(config: Mapping[str, Any]) -> list[_Rule]:
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ModelLoadError("per-level layers_per_block is not an SD1.5/SDXL UNet layout")
    up_types = config["up_block_types"]
    return _unet_rules(layers, tuple("CrossAttn" in t for t in up_types))


def unet_diffusers_to_ldm(sd: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel names -> LDM names (`input_blocks.N.M...`); shapes are equal."""
    rules = _unet_rules_for(config)
    return {_translate(key, rules): tensor for key, tensor in sd.items()}


@functools.lru_cache(maxsize=8)
def _unet_layout(config_key: str) -> tuple[dict[str, str], dict[str, torch.Size], dict[str, str]]:
    from diffusers import UNet2DConditionModel

    config = json.loads(config_key)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    rules = _unet_rules_for(config)
    sd = model.state_dict()
    modules = {
        _translate(f"{name}.weight", rules).removesuffix(".weight"): name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }
    return {k: _translate(k, rules) for k in sd}, {k: v.shape for k, v in sd.items()}, modules


def unet_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Every diffusers UNet2DConditionModel key of `config` -> its LDM key."""
    return dict(_unet_layout(_config_key(config))[0])


def controlnet_diffusers_to_ldm(
    sd: Mapping[str, Tensor], unet_config: Mapping[str, Any], hint_blocks: int
) -> dict[str, Tensor]:
    """diffusers ControlNetModel names -> the original ControlNet's (`control_model.` not included):
    its encoder half is the UNet's (`input_blocks.*`, `middle_block.*`, embeddings), plus the hint encoder
    (`input_hint_block.{0,2,..}`: conv_in, `hint_blocks` convs, conv_out, with SiLUs between) and the
    zero convolutions (`zero_convs.N.0`, `middle_block_out.0`). ComfyUI's ControlNet loader reads this
    layout from its shapes alone. `unet_config`: the UNet the ControlNet belongs to."""
    rules = _unet_rules_for(unet_config) + _rules(
        (r"controlnet_cond_embedding\.conv_in\.(\w+)", lambda m: f"input_hint_block.0.{m[1]}"),
        (
            r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)",
            lambda m: f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}",
        ),
        (
            r"controlnet_cond_embedding\.conv_out\.(\w+)",
            lambda m: f"input_hint_block.{2 * hint_blocks + 2}.{m[1]}",
        ),
        (r"controlnet_down_blocks\.(\d+)\.(\w+)", lambda m: f"zero_convs.{m[1]}.0.{m[2]}"),
        (r"controlnet_mid_block\.(\w+)", lambda m: f"middle_block_out.0.{m[1]}"),
    )
    return {_translate(key, rules): tensor for key, tensor in sd.items()}


def unet_ldm_to_diffusers(sd_ldm: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """LDM UNet weights (prefix stripped) -> a state dict `UNet2DConditionModel(**config)` loads strictly."""
    to_ldm, shapes, _ = _unet_layout(_config_key(config))
    return _invert(sd_ldm, to_ldm, shapes, "UNet")


def unet_ldm_to_diffusers_module_names(config: Mapping[str, Any]) -> dict[str, str]:
    """LDM module path -> diffusers module path for every Linear / Conv2d (the layers LoRA adapts).

    e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q` -> `down_blocks.1.attentions.0...attn1.to_q`.
    """
    return dict(_unet_layout(_config_key(config))[2])


# -------------------------------------------------------------------------------------------- CLIP

_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = {v: k for k, v in _OPENCLIP_LAYER.items()}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_TOP = {v: k for k, v in _OPENCLIP_TOP.items()}
# Present in OpenCLIP files but not part of the text encoder transformers builds.
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")
_HF_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_HF_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OC_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_OC_LAYER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")


def clip_hf_canonical(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIP keys as checkpoints store them: `text_model.*` (+ `text_projection.weight`).

    transformers >= 5.6 flattened CLIPTextModel's keys (no `text_model.`); checkpoints were written with
    it, so everything in this package speaks the prefixed form. `position_ids` buffers are dropped.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        if key.endswith("embeddings.position_ids"):
            continue
        prefixed = key.startswith("text_model.") or key == "text_projection.weight"
        out[key if prefixed else f"text_model.{key}"] = tensor
    return out


def clip_hf_for_model(sd: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Canonical HF CLIP keys -> the key names `model` (any transformers version) loads strictly."""
    sd = clip_hf_canonical(sd)
    if hasattr(model, "text_model"):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_hf_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIPTextModel(WithProjection) -> OpenCLIP text-tower names (SDXL's CLIP-G layout).

    q, k, v projections are concatenated into `in_proj_weight/bias`; `text_projection` is stored as
    [hidden, projection] in OpenCLIP (x @ P), the transpose of HF's Linear weight.
    """
    sd = clip_hf_canonical(sd)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif m := _HF_QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
        elif (m := _HF_LAYER_KEY.fullmatch(key)) and m[2] in _OPENCLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"] = tensor
        else:
            raise KeyError(f"no OpenCLIP name for {key!r}")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {layer} {param}: q, k and v projections must come together")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def clip_openclip_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text-tower names (prefix stripped) -> canonical HF names (`text_model.*`)."""
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = tensor
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.T.contiguous()
        elif m := _OC_IN_PROJ.fullmatch(key):
            for name, part in zip("qkv", tensor.chunk(3), strict=True):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part.contiguous()
        elif (m := _OC_LAYER_KEY.fullmatch(key)) and m[2] in _HF_LAYER:
            out[f"text_model.encoder.layers.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"] = tensor
        elif key not in _OPENCLIP_IGNORED:
            raise ModelLoadError(f"unexpected key {key!r} in an OpenCLIP text encoder")
    return out
