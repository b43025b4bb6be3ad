"""NVML status per GPU (memory, utilisation, processes), which must not fail on a GPU-less host."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


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
