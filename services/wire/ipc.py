"""The CUDA IPC part of the wire contract, shared by the client half (client/ipc.py) and the service
half (server/ipc.py): the params key, tensor alignment in exchange buffers, the dtypes that may travel,
and how a process is identified across PID namespaces. The protocol itself is described in server/ipc.py."""

from __future__ import annotations

import contextlib
import os

import torch

from luna_stack.wire.tensors import DTYPES

PARAM = "_ipc"
ALIGN = 256  # every tensor starts on a 256-byte boundary, as cudaMalloc's would
IPC_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int64": torch.int64, "int32": torch.int32}


def aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def pid_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None


def process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with the PID it
    names one process, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
