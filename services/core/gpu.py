"""Device and dtype selection, GPU identity and NVML status (which must not fail on a GPU-less host)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import ConfigError
from .tensors import DTYPES

log = logging.getLogger(__name__)


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for but CUDA is not available; use device: cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    return device


def select_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def gpu_uuid(device: torch.device) -> str | None:
    """The physical GPU's UUID (same string NVML reports), or None on CPU. Indices differ between
    containers; UUIDs do not, so same-GPU checks for CUDA IPC compare these."""
    if device.type != "cuda":
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_status() -> dict[str, Any]:
    """Per-GPU name, UUID, memory, utilisation and processes; `available: False` with the reason when
    there is no GPU or no NVML library."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "no GPU: pynvml (nvidia-ml-py) is not installed", "gpus": []}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"no GPU: NVML unavailable ({exc})", "gpus": []}
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except pynvml.NVMLError:
                util = None
            try:
                procs = [
                    {"pid": p.pid, "used_bytes": p.usedGpuMemory}
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                ]
            except pynvml.NVMLError:
                procs = []
            gpus.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                    "memory_used_bytes": mem.used,
                    "memory_total_bytes": mem.total,
                    "utilization_percent": util,
                    "processes": procs,
                }
            )
        return {"available": True, "gpus": gpus}
    except pynvml.NVMLError as exc:
        log.warning("NVML query failed: %s", exc)
        return {"available": False, "reason": f"NVML query failed: {exc}", "gpus": []}
    finally:
        pynvml.nvmlShutdown()
