"""How a network's weights are stored and computed (diffusion models, T5): fp32/fp16/bf16, fp8
storage, GGUF quantized storage.

- fp8: weights stored as float8_e4m3fn and upcast per layer to bf16 for the matmul (diffusers'
  layerwise casting; norms stay bf16). Halves fp16 memory; e4m3 keeps 3 mantissa bits.
- GGUF: quantized blocks stay on the device as raw bytes and are dequantized per layer at forward
  time (a parametrization on `weight`), so a Q8_0 SDXL UNet needs ~half, Q4_K ~a third of fp16 memory.
  Types diffusers can dequantize with torch (on the GPU) stay quantized; any other type the `gguf`
  package dequantizes is expanded once at load time with `gguf.quants.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from diffusers.hooks import apply_layerwise_casting
from diffusers.quantizers.gguf.utils import dequantize_functions
from torch import nn
from torch.nn.utils import parametrize

from luna_stack.wire.errors import BadRequest

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
_COMPUTE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
FP8_STORAGE = torch.float8_e4m3fn
GGUF_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations run in for a storage precision (fp8 computes in bf16)."""
    try:
        return _COMPUTE[precision]
    except KeyError:
        raise BadRequest(f"unknown precision {precision!r}", hint=f"one of {', '.join(PRECISIONS)}") from None


def load_weights(
    unet: nn.Module,
    state_dict: dict[str, torch.Tensor],
    precision: str,
    device: torch.device,
    fp8_skip: tuple[str, ...] | None = None,
) -> None:
    """Assign a diffusers-named state dict to a meta-device `unet`, stored as `precision` on `device`.
    fp8: `fp8_skip` are the module-name patterns kept in the compute dtype (None: diffusers' defaults)."""
    dtype = compute_dtype(precision)
    # Weights a file already stores as fp8 go to the device as they are: loading an fp8 file never
    # holds a bf16 copy of the whole model (a 12 GB fp8 Flux loads on a 24 GB card).
    keep = precision == "fp8"
    weights = {
        k: v.to(device, v.dtype if keep and v.dtype == FP8_STORAGE else dtype) for k, v in state_dict.items()
    }
    unet.load_state_dict(weights, strict=True, assign=True)
    del weights
    if precision == "fp8":
        if fp8_skip is None:
            unet.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=dtype)
        else:  # the model class's own skip list would be added by enable_layerwise_casting
            apply_layerwise_casting(unet, FP8_STORAGE, dtype, skip_modules_pattern=fp8_skip)
        # Layers the casting skips (norms, embeddings, diffusers' skip patterns) compute in `dtype`.
        for module in unet.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook("layerwise_casting") is not None:
                continue
            for name, param in module.named_parameters(recurse=False):
                if param.dtype == FP8_STORAGE:
                    setattr(module, name, nn.Parameter(param.to(dtype), requires_grad=False))


@dataclass(frozen=True)
class QuantizedWeight:
    """One GGUF tensor as stored in the file: raw blocks plus the logical (PyTorch) shape."""

    raw: torch.Tensor  # uint8, one row per block run; row-major flattening matches the logical order
    qtype: gguf.GGMLQuantizationType
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dequantizes_on_device(self) -> bool:
        return self.qtype in dequantize_functions

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_raw(self.raw, self.qtype, self.shape, dtype)

    def to_device(self, device: torch.device) -> QuantizedWeight:
        return QuantizedWeight(self.raw.to(device), self.qtype, self.shape)

    def rows(self, start: int, end: int) -> QuantizedWeight | None:
        """Rows [start, end) of a 2-D weight, still quantized; None when a row is not whole blocks."""
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        width = self.shape[-1]
        if self.ndim != 2 or width % block_size:
            return None
        row_bytes = width // block_size * type_size
        flat = self.raw.reshape(-1)
        return QuantizedWeight(
            flat[start * row_bytes : end * row_bytes], self.qtype, torch.Size((end - start, width))
        )

    @staticmethod
    def concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Row blocks of one type and width stacked (the inverse of `rows`)."""
        if len(parts) == 1:
            return parts[0]
        rows = sum(p.shape[0] for p in parts)
        raw = torch.cat([p.raw.reshape(-1) for p in parts])
        return QuantizedWeight(raw, parts[0].qtype, torch.Size((rows, *parts[0].shape[1:])))

    def reshape(self, shape: torch.Size) -> QuantizedWeight:
        """Same blocks, another logical shape (e.g. a 1x1 conv read as a Linear): the flat order holds."""
        shape = torch.Size(shape)
        if shape.numel() != self.shape.numel():
            raise ValueError(f"cannot view a {list(self.shape)} GGUF tensor as {list(shape)}")
        return QuantizedWeight(self.raw, self.qtype, shape)


def dequantize_raw(
    raw: torch.Tensor, qtype: gguf.GGMLQuantizationType, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """Expand GGUF blocks to a float tensor of `shape`: torch (any device) where diffusers has the
    kernel, else the gguf package's numpy reference on the CPU."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in dequantize_functions:
        blocks = raw.reshape(-1, type_size)
        values = dequantize_functions[qtype](blocks, block_size, type_size, torch.float32)
        return values.reshape(shape).to(dtype)
    values = gguf.quants.dequantize(raw.cpu().numpy().reshape(-1, type_size), qtype)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape).to(device=raw.device, dtype=dtype)


class _Dequantize(nn.Module):
    """Parametrization: the module's `weight` is computed from its raw GGUF bytes at each access."""

    def __init__(self, qtype: gguf.GGMLQuantizationType, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.qtype = qtype
        self.shape = shape
        self.dtype = dtype

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return dequantize_raw(raw, self.qtype, self.shape, self.dtype)


def install_gguf_weights(
    unet: nn.Module,
    state_dict: dict[str, torch.Tensor | QuantizedWeight],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Assign a diffusers-named state dict whose values may be quantized to a meta-device `unet`.

    Plain tensors load in `dtype`; quantized weights that torch can dequantize stay quantized on the
    device behind a parametrization; the rest (and quantized 1-D tensors) are expanded once here.
    """
    plain: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        if not isinstance(value, QuantizedWeight):
            plain[name] = value.to(device, dtype)
        elif not value.dequantizes_on_device or value.ndim < 2:
            plain[name] = value.to_device(device).dequantize(dtype)
        else:
            module_name, _, attr = name.rpartition(".")
            module = unet.get_submodule(module_name)
            expected = getattr(module, attr).shape
            if tuple(expected) != tuple(value.shape):
                raise ValueError(f"{name}: file shape {list(value.shape)} != model shape {list(expected)}")
            setattr(module, attr, nn.Parameter(value.raw.to(device), requires_grad=False))
            parametrize.register_parametrization(
                module, attr, _Dequantize(value.qtype, value.shape, dtype), unsafe=True
            )
    result = unet.load_state_dict(plain, strict=False, assign=True)
    # Quantized weights were installed above; everything else must come from the file.
    missing = [k for k in result.missing_keys if not k.endswith(".original")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"GGUF tensors do not match the UNet: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def resident_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers occupy where they live (quantized/fp8 as stored)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
