"""Device and dtype selection and GPU identity (UUIDs, which stay the same across containers)."""

from __future__ import annotations

import asyncio

import torch

from luna_stack.wire.errors import ConfigError
from luna_stack.wire.tensors import DTYPES


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


async def stream_drained(device: torch.device) -> None:
    """Until the work queued so far on this thread's current stream of `device` has run, awaited from a
    worker thread: an event loop must not block on the GPU (the stream's kernels may queue behind a
    forward another thread is running)."""
    if device.type != "cuda":
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    if not done.query():
        await asyncio.to_thread(done.synchronize)


class StreamMarks:
    """The batcher's device marks on CUDA: an event recorded on the compute thread's stream after a
    batch's work is queued, waited for from a worker thread."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()
