"""Progress of long operations (tiled decodes, queued work), readable at GET /v1/progress/<request_id>.

Clients pick a request_id, send it in the params, and poll while the request runs (ComfyUI's progress
bar). Entries are dropped a while after they finish, so the table stays small.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_KEEP_S = 300.0


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    updated: float  # time.monotonic()


class ProgressTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Progress] = {}

    def tracker(self, request_ids: Iterable[str | None], total: int) -> Callable[[], None]:
        """A callback for the compute thread: each call is one unit of work done for these requests."""
        ids = [r for r in request_ids if r]
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            self._set(ids, min(done, total), total)

        self._set(ids, 0, total)
        return tick

    def _set(self, ids: list[str], done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            for request_id in ids:
                self._entries[request_id] = Progress(done, total, now)
            for stale in [k for k, e in self._entries.items() if now - e.updated > _KEEP_S]:
                del self._entries[stale]

    def get(self, request_id: str) -> Progress | None:
        with self._lock:
            return self._entries.get(request_id)
