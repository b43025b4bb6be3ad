"""Who uses a service and what was slow: request counts per client and a ring of recent slow requests,
both bounded, reported in GET /v1/status (and drawn by the status page)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_CLIENTS = 256  # past this, the client seen longest ago is forgotten
SLOW_KEPT = 50


@dataclass
class ClientCounts:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0  # summed request time
    first_seen: float = 0.0
    last_seen: float = 0.0
    last_error: str | None = None  # "<status> <code>" of the latest failure


@dataclass(frozen=True)
class SlowRequest:
    at: float
    method: str
    path: str
    client: str
    status: int
    code: str
    ms: float


class Activity:
    def __init__(self, slow_ms: float):
        self.slow_ms = slow_ms
        self._clients: OrderedDict[str, ClientCounts] = OrderedDict()
        self._slow: deque[SlowRequest] = deque(maxlen=SLOW_KEPT)

    def record(self, method: str, path: str, client: str, status: int, code: str, seconds: float) -> None:
        """One finished operation or model request (the polling of status and health is not recorded)."""
        now = time.time()
        entry = self._clients.pop(client, None) or ClientCounts(first_seen=now)
        self._clients[client] = entry  # most recently seen last
        if status < 400:
            entry.ok += 1
        else:
            entry.failed += 1
            entry.last_error = f"{status} {code}"
        entry.seconds += seconds
        entry.last_seen = now
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)
        if seconds * 1000 >= self.slow_ms:
            self._slow.append(SlowRequest(now, method, path, client, status, code, round(seconds * 1000, 2)))

    def clients(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(c) | {"seconds": round(c.seconds, 4)} for name, c in self._clients.items()}

    def slow(self) -> list[dict[str, Any]]:
        """Most recent first."""
        return [asdict(r) for r in reversed(self._slow)]
