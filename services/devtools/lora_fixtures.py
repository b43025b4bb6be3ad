"""Random LoRA files in the real key layouts, written for a given diffusers / transformers model (tests).

`write_lora` returns the ground truth it wrote, keyed by the model's own module names and shaped like the
module (Linear: down [r, in], up [out, r]; Conv2d: down [r, in, kh, kw], up [out, r, 1, 1]), so a test
can merge it into a private copy of the model without going through the parser under test.
`tiny_unet` / `tiny_clip` build the small real architectures those tests use.
"""

from __future__ import annotations

import json
import math
import os
from typing import Literal

import safetensors.torch
import torch
from torch import nn

from luna_stack.lora.format import Component, LoraFactors
from luna_stack.lora.resolve import adaptable_modules
from luna_stack.weights.ldm_layout import unet_ldm_to_diffusers_module_names

Format = Literal["kohya", "peft", "ldm"]
_PEFT_PREFIX: dict[Component, str] = {"unet": "unet", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# Factor magnitudes: each adapted layer moves by ~10-20% of its base output, clearly visible, still sane.
_UP_GAIN = 0.1


def _file_names(model: nn.Module, component: Component, names: list[str], ldm: bool) -> dict[str, str]:
    """Module name -> the path a LoRA file uses for it."""
    if component == "unet":
        if not ldm:
            return {n: n for n in names}
        to_ldm = {d: ldm_name for ldm_name, d in unet_ldm_to_diffusers_module_names(model.config).items()}
        return {n: to_ldm[n] for n in names}
    # LoRA files name CLIP modules text_model.*; transformers >= 5.6 CLIPTextModel has no such level.
    return {n: n if hasattr(model, "text_model") else f"text_model.{n}" for n in names}


def _random_factors(module: nn.Module, rank: int, alpha: float, gen: torch.Generator) -> LoraFactors:
    if isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * math.prod(module.kernel_size)
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
    else:
        fan_in = module.in_features
        down = torch.randn(rank, module.in_features, generator=gen)
        up = torch.randn(module.out_features, rank, generator=gen)
    return LoraFactors(down / math.sqrt(fan_in), up * (_UP_GAIN / math.sqrt(rank)), alpha)


def write_lora(
    path: str | os.PathLike[str],
    model: nn.Module,
    component: Component,
    fmt: Format = "kohya",
    rank: int = 4,
    alpha: float | None = None,
    targets: Literal["attn", "all"] = "attn",
    seed: int = 0,
    unet_ldm_names: bool = False,
    kohya_te: Literal["te", "te1"] = "te1",
) -> dict[str, LoraFactors]:
    """Write a random LoRA for `model` (the `component`) and return what it holds per module name.

    targets: "attn" = the attention projections, "all" = every Linear and Conv2d (LoCon). The "ldm" format
    (`diffusion_model.` + LDM path) exists for the UNet only; `unet_ldm_names` makes kohya use LDM paths
    (as SDXL kohya files do). kohya_te picks SD1.5's `lora_te_` or SDXL's `lora_te1_` for CLIP-L.
    alpha=None writes no alpha for peft/ldm (readers use alpha = rank) and alpha = rank for kohya.
    """
    if fmt == "ldm" and component != "unet":
        raise ValueError("LDM-named LoRA files exist for the UNet only")
    modules = adaptable_modules(model)
    names = sorted(n for n, m in modules.items() if targets == "all" or (".attn" in n or "self_attn" in n))
    file_names = _file_names(model, component, names, unet_ldm_names or fmt == "ldm")
    gen = torch.Generator().manual_seed(seed)
    truth: dict[str, LoraFactors] = {}
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name in names:
        factors = _random_factors(modules[name], rank, float(rank) if alpha is None else alpha, gen)
        truth[name] = factors
        path_in_file = file_names[name]
        if fmt == "kohya":
            te = {"unet": "unet", "clip_l": kohya_te, "clip_g": "te2"}[component]
            base = f"lora_{te}_{path_in_file.replace('.', '_')}"
            down_key, up_key = f"{base}.lora_down.weight", f"{base}.lora_up.weight"
            tensors[f"{base}.alpha"] = torch.tensor(factors.alpha)
        elif fmt == "peft":
            base = f"{_PEFT_PREFIX[component]}.{path_in_file}"
            down_key, up_key = f"{base}.lora_A.weight", f"{base}.lora_B.weight"
        else:
            base = f"diffusion_model.{path_in_file}"
            down_key, up_key = f"{base}.lora_down.weight", f"{base}.lora_up.weight"
            if alpha is not None:
                tensors[f"{base}.alpha"] = torch.tensor(float(alpha))
        tensors[down_key], tensors[up_key] = factors.down, factors.up
    if fmt == "peft" and alpha is not None:  # diffusers keeps the PEFT config in the file's metadata
        prefix = _PEFT_PREFIX[component]
        config = {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha}
        metadata["lora_adapter_metadata"] = json.dumps(config)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata)
    return truth


def tiny_unet(sdxl: bool = True, seed: int = 0) -> nn.Module:
    """A small UNet2DConditionModel: SDXL-like (linear proj_in, class projection `y`, attention in the
    lower level) or SD1.5-like (1x1 conv proj_in, attention in the upper level). 8x8 latents, context 32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=48,
            **common,
        ).eval()
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=False,
        **common,
    ).eval()


def tiny_clip(projection: bool = False, seed: int = 0) -> nn.Module:
    """A small transformers CLIPTextModel (CLIP-L role) or CLIPTextModelWithProjection (CLIP-G role)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()
