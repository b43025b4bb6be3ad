"""Helpers for the UNet tests (no tests here): an independent diffusers reference, step inputs, GGUF files.

The reference model is built without the service's loader: diffusers' own `convert_ldm_unet_checkpoint`
maps the file's LDM keys, and the config is the fixture generator's, not the one inferred from the file.
GGUF files are written with the `gguf` package the way city96's ComfyUI-GGUF files are: LDM keys,
`general.architecture` sd1/sdxl, 1-D and tiny tensors F32, tensors whose last dimension does not fit
the block size reshaped to rows of 256 with `comfy.gguf.orig_shape.<key>` recording the real shape.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file

from luna_stack.devtools.fixtures import unet_config

LDM_PREFIX = "model.diffusion_model."
Q = gguf.GGMLQuantizationType
# Offsets of the fp16 scale fields in one block of each type (ggml's block layouts).
_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
_SCALE_OFFSETS |= {Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def ldm_unet(path: Path) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint or unet/ file, LDM keys without the prefix."""
    sd = load_file(str(path))
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k.removeprefix(LDM_PREFIX): v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    return sd


def reference_unet(sd_ldm: dict[str, torch.Tensor], family: str) -> UNet2DConditionModel:
    """fp32 diffusers UNet from LDM weights via diffusers' converter and the fixture's config."""
    config = unet_config(family, "small")
    sd = convert_ldm_unet_checkpoint({LDM_PREFIX + k: v.float() for k, v in sd_ldm.items()}, config)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(sd, strict=True)
    return unet.eval().requires_grad_(False)


def step_inputs(
    unet: UNet2DConditionModel, batch: int, height: int = 8, width: int = 8, tokens: int = 77, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    out = {
        "x": torch.randn(batch, cfg.in_channels, height, width, generator=gen),
        "timesteps": torch.rand(batch, generator=gen) * 999,
        "context": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.class_embed_type == "projection":
        out["y"] = torch.randn(batch, cfg.projection_class_embeddings_input_dim, generator=gen)
    return out


def reference_step(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return unet(
            inputs["x"], inputs["timesteps"], inputs["context"], class_labels=inputs.get("y"), **kwargs
        ).sample


def random_blocks(
    qtype: gguf.GGMLQuantizationType, n_blocks: int, seed: int, std: float = 0.02
) -> np.ndarray:
    """Valid blocks of a type gguf cannot quantize to: random payload, scale fields set so the
    dequantized values have about `std`."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def with_scale(scale: float) -> np.ndarray:
        out = blocks.copy()
        for offset in _SCALE_OFFSETS[qtype]:
            out[:, offset : offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
        return out

    unit = gguf.quants.dequantize(with_scale(1.0), qtype)
    return with_scale(std / float(unit.std()))


QuantChoice = Callable[[str, np.ndarray], gguf.GGMLQuantizationType]


def write_gguf(
    path: Path, sd_ldm: dict[str, torch.Tensor], arch: str, choose: QuantChoice, seed: int = 0
) -> dict:
    """Write `sd_ldm` as a city96-style GGUF; returns the weights the file actually holds (dequantized
    with the gguf package, fp32, original shapes) for building the reference."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    held: dict[str, torch.Tensor] = {}
    for i, (key, tensor) in enumerate(sd_ldm.items()):
        data = tensor.float().numpy()
        qtype = Q.F32 if data.ndim <= 1 or data.size <= 1024 else choose(key, data)
        if qtype not in (Q.F32, Q.F16):
            block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
            if data.shape[-1] % block_size:
                if data.size % 256:
                    qtype = Q.F16  # city96 falls back to F16 when nothing fits
                else:
                    writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
                    data = data.reshape(-1, 256)
        if qtype in _SCALE_OFFSETS:
            rows, cols = data.shape[0] if data.ndim > 1 else 1, data.shape[-1]
            block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
            raw = random_blocks(qtype, rows * cols // block_size, seed + i).reshape(rows, -1)
        else:
            raw = gguf.quants.quantize(data, qtype)
        writer.add_tensor(key, raw, raw_dtype=qtype)
        values = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        held[key] = torch.from_numpy(values.reshape(tensor.shape).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
