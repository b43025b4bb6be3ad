"""One thread owns the compute device.

CUDA work from one service is serialised anyway; running it on a dedicated thread keeps the event loop
free to stream bodies while a forward runs (torch releases the GIL inside kernels).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")


class GpuExecutor:
    def __init__(self, name: str):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{name}-compute"
        )

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
