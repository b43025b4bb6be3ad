"""What an app holds besides its service: readiness, counters and the Redis-backed parts, typed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from luna_stack.server.activity import Activity
from luna_stack.server.service import Service

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from luna_stack.jobs.queue import JobQueue
    from luna_stack.jobs.registry import Registry
    from luna_stack.jobs.worker import QueueWorker


@dataclass
class RequestCounts:
    ok: int = 0
    failed: int = 0
    client_gone: int = 0  # disconnected before their reply: dropped, not failed

    def count(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)


@dataclass
class AppState:
    address: str  # host:port advertised in the registry
    activity: Activity  # per-client counts, recent slow requests
    started: float = field(default_factory=time.time)
    preloaded: bool = False
    preload_error: str | None = None
    requests: RequestCounts = field(default_factory=RequestCounts)
    redis: aioredis.Redis | None = None
    queue: JobQueue | None = None
    worker: QueueWorker | None = None
    registry: Registry | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


SERVICE = web.AppKey("service", Service)
STATE = web.AppKey("state", AppState)
