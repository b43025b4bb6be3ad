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
    input is checked once per request, before the family sees it: `check_finite`)."""
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


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """InvalidTensor naming the first floating-point tensor holding NaN or infinity. One reduction and one
    host synchronisation per device for all of them: on the GPU each check is a round trip to the device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    for named in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        if bad:
            raise InvalidTensor(f"tensor {bad[0]!r} contains NaN or infinite values")
