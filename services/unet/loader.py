"""Load a UNet from the files ComfyUI users have into diffusers' UNet2DConditionModel.

Accepted: single-file checkpoints (`model.diffusion_model.*` among VAE/CLIP weights), standalone UNet
files in the LDM layout (`unet/*.safetensors`, keys `input_blocks.*`), fp8 copies of either, and GGUF
files in city96's ComfyUI-GGUF convention (LDM keys, optional `model.diffusion_model.` prefix, tensors
reshaped for quantization carry `comfy.gguf.orig_shape.<key>`). The architecture comes from the keys and
shapes, so the same code loads a real SDXL file and a small random-weight fixture.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from diffusers import UNet2DConditionModel

from luna_stack.weights.checkpoint import (
    detect,
    error_reason,
    load_shapes,
    load_state_dict,
    unet_config_from_state_dict,
)
from luna_stack.weights.ldm_layout import unet_ldm_to_diffusers
from luna_stack.wire.errors import ModelLoadError

from .precision import (
    GGUF_PLAIN_TYPES,
    QuantizedWeight,
    compute_dtype,
    install_gguf_weights,
    load_weights,
    resident_bytes,
)

LDM_PREFIX = "model.diffusion_model."
ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
GGUF_MAGIC = b"GGUF"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

UnetStateDict = dict[str, "torch.Tensor | QuantizedWeight"]


@dataclass
class LoadedUnet:
    """A resident UNet and what requests are validated against."""

    name: str
    path: Path
    unet: UNet2DConditionModel
    precision: str  # fp32 / fp16 / bf16 / fp8 / gguf
    dtype: torch.dtype  # compute dtype
    device: torch.device
    nbytes: int
    load_seconds: float
    quant_types: dict[str, int] = field(default_factory=dict)  # GGUF: tensor count per type
    runner: Any = None  # its step runner (step_runner.py): eager, or CUDA graphs where they are on

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def family(self) -> str:
        return "sdxl" if self.adm_channels else "sd15"

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def context_dim(self) -> int:
        return int(self.config.cross_attention_dim)

    @property
    def adm_channels(self) -> int | None:
        """Width of `y` (SDXL: 2816), None for models without a label embedding."""
        if self.config.class_embed_type != "projection":
            return None
        return int(self.config.projection_class_embeddings_input_dim)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "family": self.family,
            "precision": self.precision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "bytes": self.nbytes,
            "load_seconds": round(self.load_seconds, 3),
            **({"gguf_types": self.quant_types} if self.quant_types else {}),
        }


def read_safetensors_unet(path: Path) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint or standalone UNet file, LDM names without the prefix."""
    unet = detect(load_shapes(path)).require("unet")
    if unet.layout != "ldm":
        raise ModelLoadError(
            f"{path.name} is a diffusers-layout UNet; only the original (LDM) layout is supported",
            hint="use the single-file checkpoint or an LDM-layout unet/ file",
        )
    return load_state_dict(path, prefix=unet.prefix)


def _orig_shape(reader: gguf.GGUFReader, name: str) -> torch.Size | None:
    fld = reader.get_field(ORIG_SHAPE_FIELD + name)
    if fld is None:
        return None
    return torch.Size(int(fld.parts[i][0]) for i in fld.data)


def read_gguf_unet(path: Path) -> tuple[UnetStateDict, str | None]:
    """GGUF tensors by LDM name (prefix stripped) and the file's `general.architecture`."""
    reader = gguf.GGUFReader(str(path))
    arch_field = reader.get_field("general.architecture")
    arch = str(arch_field.parts[arch_field.data[-1]], encoding="utf-8") if arch_field else None
    sd: UnetStateDict = {}
    for t in reader.tensors:
        name = t.name.removeprefix(LDM_PREFIX)
        shape = _orig_shape(reader, t.name) or torch.Size(int(v) for v in reversed(t.shape))
        with warnings.catch_warnings():  # the reader's arrays are read-only views of the mmap; we copy
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(np.array(t.data))
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype in GGUF_PLAIN_TYPES:
            sd[name] = data.view(GGUF_PLAIN_TYPES[qtype]).reshape(shape)
        else:
            sd[name] = QuantizedWeight(data.view(torch.uint8), qtype, shape)
    return sd, arch


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def detect_precision(sd: UnetStateDict, requested: str) -> str:
    """A GGUF file is 'gguf'; a file stored in fp8 is served as fp8; anything else as requested."""
    values = list(sd.values())
    if any(isinstance(v, QuantizedWeight) for v in values):
        return "gguf"
    if any(v.dtype in FP8_DTYPES for v in values):
        return "fp8"
    return requested


def build_unet(
    sd_ldm: UnetStateDict, precision: str, dtype: torch.dtype, device: torch.device
) -> UNet2DConditionModel:
    """The diffusers UNet for an LDM state dict, weights loaded, frozen, in eval mode; `dtype` is the
    compute dtype (for GGUF, what weights dequantize to)."""
    try:
        config = unet_config_from_state_dict(sd_ldm)
        sd = unet_ldm_to_diffusers(sd_ldm, config)
    except ModelLoadError:
        raise
    except (KeyError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"not an SD1.5/SDXL UNet: {exc}") from None
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    if precision == "gguf":
        install_gguf_weights(unet, sd, dtype, device)
    else:
        load_weights(unet, sd, precision, device)
    unet.eval().requires_grad_(False)
    return unet


def load_unet(name: str, path: Path, precision: str, device: torch.device) -> LoadedUnet:
    """Read `path` (safetensors or GGUF) and build the UNet on `device` in `precision` (unless the file
    fixes it: GGUF weights stay quantized and compute in `precision`'s dtype; fp8 files compute in bf16)."""
    started = time.monotonic()
    quant_types: dict[str, int] = {}
    try:
        if is_gguf(path):
            sd, _arch = read_gguf_unet(path)
            for v in sd.values():
                kind = v.qtype.name if isinstance(v, QuantizedWeight) else str(v.dtype).removeprefix("torch.")
                quant_types[kind] = quant_types.get(kind, 0) + 1
        else:
            sd = read_safetensors_unet(path)
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors / gguf raise their own types for corrupt files
        raise ModelLoadError(f"cannot read {path.name}: {error_reason(exc)}") from None
    dtype = compute_dtype(precision)
    precision = detect_precision(sd, precision)
    if precision == "fp8":
        dtype = compute_dtype("fp8")
    unet = build_unet(sd, precision, dtype, device)
    return LoadedUnet(
        name=name,
        path=path,
        unet=unet,
        precision=precision,
        dtype=dtype,
        device=device,
        nbytes=resident_bytes(unet),
        load_seconds=time.monotonic() - started,
        quant_types=quant_types,
    )
