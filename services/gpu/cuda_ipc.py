"""CUDA IPC through the driver API (libcuda), with no torch internals and no shared-memory files.

A client allocates its exchange buffers with `cuMemAlloc` (outside torch's caching allocator, so the
handle covers exactly the buffer whatever the allocator's configuration) and exports each once; the
service opens the handle, keeps the mapping and wraps it as a tensor. Both sides identify the GPU by
PCI bus id for the driver and by UUID for the same-GPU check: device indices differ between containers.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from luna_stack.wire.errors import IpcUnavailable, Unavailable

HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1
_local = threading.local()


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]


_driver: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise Unavailable(f"CUDA driver library not found: {exc}") from None
        u64, ptr = ctypes.c_uint64, ctypes.c_void_p
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuDeviceGetByPCIBusId.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ptr), ctypes.c_int]
        lib.cuCtxSetCurrent.argtypes = [ptr]
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [u64]
        lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), u64]
        lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(u64), _IpcHandle, ctypes.c_uint]
        lib.cuIpcCloseMemHandle.argtypes = [u64]
        _driver = lib
    return _driver


def _check(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _lib().cuGetErrorString(result, ctypes.byref(text))
        detail = text.value.decode() if text.value else "unknown error"
        raise IpcUnavailable(f"{what} failed: CUDA error {result} ({detail})")


def _make_current(device: torch.device) -> None:
    """Make the device's primary context (the one torch uses) current on this thread."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if getattr(_local, "index", None) == index:
        return
    torch.cuda.init()
    props = torch.cuda.get_device_properties(index)
    bus_id = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0".encode()
    lib = _lib()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(lib.cuDeviceGetByPCIBusId(ctypes.byref(dev), bus_id), "cuDeviceGetByPCIBusId")
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    _local.index = index


class _ArrayInterface:
    """What torch.as_tensor needs to view raw device memory without owning it."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def wrap(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over `nbytes` of device memory at `ptr` (the caller keeps the memory alive)."""
    return torch.as_tensor(_ArrayInterface(ptr, nbytes), device=device)


@dataclass
class ExportedBuffer:
    """Client side: device memory of its own, exported once. `tensor` views all of it as uint8."""

    device: torch.device
    nbytes: int
    ptr: int
    handle: bytes
    tensor: torch.Tensor

    @classmethod
    def allocate(cls, device: torch.device, nbytes: int) -> ExportedBuffer:
        _make_current(device)
        lib = _lib()
        ptr = ctypes.c_uint64()
        _check(lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        handle = _IpcHandle()
        try:
            _check(lib.cuIpcGetMemHandle(ctypes.byref(handle), ptr.value), "cuIpcGetMemHandle")
        except IpcUnavailable:
            lib.cuMemFree_v2(ptr.value)
            raise
        return cls(device, nbytes, ptr.value, bytes(handle.reserved), wrap(ptr.value, nbytes, device))

    def free(self) -> None:
        if self.ptr:
            torch.cuda.synchronize(self.device)  # nothing queued may still write into it
            _make_current(self.device)
            _lib().cuMemFree_v2(self.ptr)
            self.ptr = 0


@dataclass
class OpenedBuffer:
    """Service side: a client's buffer mapped into this process."""

    device: torch.device
    nbytes: int
    ptr: int
    tensor: torch.Tensor

    @classmethod
    def open(cls, handle: bytes, nbytes: int, device: torch.device) -> OpenedBuffer:
        if len(handle) != HANDLE_BYTES:
            raise IpcUnavailable(f"an IPC handle has {HANDLE_BYTES} bytes, got {len(handle)}")
        _make_current(device)
        raw = _IpcHandle.from_buffer_copy(handle)
        ptr = ctypes.c_uint64()
        _check(
            _lib().cuIpcOpenMemHandle_v2(ctypes.byref(ptr), raw, _LAZY_ENABLE_PEER_ACCESS),
            "cuIpcOpenMemHandle",
        )
        return cls(device, nbytes, ptr.value, wrap(ptr.value, nbytes, device))

    def close(self) -> None:
        if self.ptr:
            torch.cuda.synchronize(self.device)  # no queued kernel may touch it after the unmap
            _make_current(self.device)
            _lib().cuIpcCloseMemHandle(self.ptr)
            self.ptr = 0
