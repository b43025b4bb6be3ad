"""Service registry: each replica announces itself with a TTL heartbeat; clients and `status` read it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from luna_stack.wire import keys


@dataclass
class ReplicaInfo:
    id: str
    kind: str
    address: str  # host:port clients connect to
    gpu_uuid: str | None
    device: str
    models: list[str] = field(default_factory=list)
    ipc: bool = False
    load: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class Registry:
    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    @staticmethod
    def _key(kind: str, replica_id: str) -> str:
        return keys.replica(kind, replica_id)

    async def announce(self, info: ReplicaInfo, ttl_s: float) -> None:
        payload = json.dumps({**asdict(info), "seen": time.time()})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(info.kind, info.id), payload, px=int(ttl_s * 1000))
            pipe.sadd(keys.replicas(info.kind), info.id)
            await pipe.execute()

    async def withdraw(self, kind: str, replica_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(kind, replica_id))
            pipe.srem(keys.replicas(kind), replica_id)
            await pipe.execute()

    async def replicas(self, kind: str) -> list[ReplicaInfo]:
        """Live replicas of a kind; members whose heartbeat expired are pruned from the set."""
        ids = sorted(i.decode() for i in await self.redis.smembers(keys.replicas(kind)))
        if not ids:
            return []
        values = await self.redis.mget([self._key(kind, i) for i in ids])
        live = []
        for replica_id, raw in zip(ids, values, strict=True):
            if raw is None:
                await self.redis.srem(keys.replicas(kind), replica_id)
                continue
            data = json.loads(raw)
            data.pop("seen", None)
            live.append(ReplicaInfo(**data))
        return live
