"""One thread owns the compute device.

CUDA work from one service is serialised anyway; running it on a dedicated thread keeps the event loop
free to stream bodies while a forward runs (torch releases the GIL inside kernels).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")
log = logging.getLogger(__name__)


class GpuExecutor:
    def __init__(self, name: str):
        self.name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{name}-compute"
        )
        self._last: concurrent.futures.Future[Any] | None = None
        # Set at shutdown: long operations check it between units of work (tiles) and give up.
        self.stopping = threading.Event()

    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        future = self._pool.submit(functools.partial(fn, *args, **kwargs))
        self._last = future
        return await asyncio.wrap_future(future)

    @property
    def busy(self) -> bool:
        return self._last is not None and not self._last.done()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Drop queued work, let the running operation stop at its next check, and wait at most
        `timeout_s` for it: a service must answer SIGTERM within seconds whatever it computes."""
        self.stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._last is not None:
            concurrent.futures.wait([self._last], timeout=timeout_s)
        if self.busy:
            log.warning(
                "%s: a forward is still running after %.0f s; exiting without it", self.name, timeout_s
            )
