"""The one finiteness check of a request's inputs, before the family sees them: InvalidTensor names the
first floating-point tensor holding NaN or infinity.

One reduction per device for all of a request's tensors. On the GPU its result reaches the host through
pinned memory behind an event, which the event loop awaits from a worker thread instead of blocking on
it: the small kernels queue behind whatever the device is running (another client's batch), and the loop
must not stop every other client's requests and replies meanwhile. The wait also orders what this stream
made for the request (held tensors moved to the device) before the compute thread reads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from luna_stack.gpu.device import stream_drained
from luna_stack.wire.errors import InvalidTensor


async def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    for device, named in by_device.items():
        flags = torch.stack([torch.isfinite(t).all() for _, t in named])
        if device.type == "cuda":
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            await stream_drained(device)
            flags = host
        bad = [name for (name, _), ok in zip(named, flags.tolist(), strict=True) if not ok]
        if bad:
            raise InvalidTensor(f"tensor {bad[0]!r} contains NaN or infinite values")
