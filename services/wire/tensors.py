"""Checks on tensors that arrive from clients: a bad tensor is a 4xx, never a crash deep in a model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from luna_stack.wire.errors import BadRequest, InvalidTensor

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def require_tensor(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    *,
    rank: int | None = None,
    dims: Mapping[int, int] | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """Return tensors[name] after checking rank, fixed dimension sizes and dtype kind (finiteness of every
    input is checked once per request, before the family sees it: server/finite.py)."""
    if name not in tensors:
        raise BadRequest(f"missing tensor {name!r}", details={"received": sorted(tensors)})
    t = tensors[name]
    if rank is not None and t.dim() != rank:
        raise InvalidTensor(f"tensor {name!r} must have {rank} dimensions, got shape {list(t.shape)}")
    for dim, size in (dims or {}).items():
        if t.shape[dim] != size:
            raise InvalidTensor(
                f"tensor {name!r} must have size {size} in dimension {dim}, got shape {list(t.shape)}"
            )
    if floating and t.dtype not in FLOAT_DTYPES:
        raise InvalidTensor(f"tensor {name!r} must be fp32, fp16 or bf16, got {dtype_name(t.dtype)}")
    if t.numel() == 0:
        raise InvalidTensor(f"tensor {name!r} is empty (shape {list(t.shape)})")
    return t
