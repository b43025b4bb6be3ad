"""Service registry: each replica announces itself with a TTL heartbeat; clients and `status` read it.

Anyone who can write to Redis can write a registry entry, so an entry is only believed when it is
authenticated. With a bearer token (LUNA_TOKEN) every replica signs its entry: HMAC-SHA256, keyed by the
token, over the entry's canonical JSON (sorted keys, no spaces), which includes the time it stops being
valid, so an old entry cannot be replayed for long. Readers holding the same token drop entries whose
signature does not verify. Without a token there is no secret to sign with: entries are unsigned, and
readers only accept those whose address is a loopback address (a replica on this host), so a forged
entry can never point a client at another machine. Malformed entries are skipped with a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis.asyncio as aioredis

from luna_stack.wire import keys
from luna_stack.wire.contract import is_loopback

log = logging.getLogger(__name__)
SIGNATURE = "sig"
_DOMAIN = b"luna-stack registry entry v1\n"
# Clocks of replicas and clients may differ this much before a signed entry counts as expired.
CLOCK_SLACK_S = 30.0
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)$")


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


class InvalidEntry(ValueError):
    """A registry entry that is not believed; the message says why."""


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(entry: dict[str, Any], token: str) -> str:
    """HMAC-SHA256 (hex) of the entry without its signature field, keyed by the bearer token."""
    body = {k: v for k, v in entry.items() if k != SIGNATURE}
    return hmac.new(token.encode(), _DOMAIN + canonical(body), hashlib.sha256).hexdigest()


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of a `host:port` / `[v6]:port` address; InvalidEntry when it is anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidEntry(f"address {address[:80]!r} is not host:port")
    return host.strip("[]"), int(port)


_REQUIRED = ("id", "kind", "address", "device")
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "kind": (str,),
    "address": (str,),
    "gpu_uuid": (str, type(None)),
    "device": (str,),
    "models": (list,),
    "ipc": (bool,),
    "load": (dict,),
    "started": (int, float),
}


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return bool in types if isinstance(value, bool) else isinstance(value, types)


def _check_fields(data: dict[str, Any]) -> None:
    for name in _REQUIRED:
        if name not in data:
            raise InvalidEntry(f"field {name!r} missing")
    for name, types in _TYPES.items():
        if name in data and not _is(data[name], types):
            raise InvalidEntry(f"field {name!r} has the wrong type")
    if not all(isinstance(m, str) for m in data.get("models", [])):
        raise InvalidEntry("field 'models' must be a list of names")
    if not all(_is(v, (int, float)) for v in data.get("load", {}).values()):
        raise InvalidEntry("field 'load' must map names to numbers")


def verify(raw: bytes, kind: str, replica_id: str, token: str | None, now: float) -> ReplicaInfo:
    """The ReplicaInfo of one stored entry, or InvalidEntry with the reason it is not believed."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidEntry("not JSON") from None
    if not isinstance(data, dict):
        raise InvalidEntry("not a JSON object")
    if token is not None:
        given = data.get(SIGNATURE)
        if not isinstance(given, str):
            raise InvalidEntry("unsigned (this reader has a token: replicas must sign with it)")
        if not hmac.compare_digest(given.encode(), sign(data, token).encode()):
            raise InvalidEntry("signature does not verify with this reader's token")
        expires = data.get("expires")
        if not _is(expires, (int, float)):
            raise InvalidEntry("signed entry without an expiry time")
        if expires + CLOCK_SLACK_S < now:
            raise InvalidEntry(f"signed entry expired {now - expires:.0f} s ago (replayed?)")
    _check_fields(data)
    if data["kind"] != kind or data["id"] != replica_id:
        raise InvalidEntry("its kind or id differs from the key it is stored under")
    host, _port = split_address(data["address"])
    if token is None and not is_loopback(host):
        raise InvalidEntry(
            f"unsigned entry for non-loopback address {data['address']!r}: without a token only "
            "replicas on this host are trusted (set LUNA_TOKEN on replicas and clients)"
        )
    return ReplicaInfo(**{f.name: data[f.name] for f in fields(ReplicaInfo) if f.name in data})


@dataclass(frozen=True)
class Skipped:
    kind: str
    id: str
    reason: str


class Registry:
    def __init__(self, redis: aioredis.Redis, *, token: str | None = None):
        self.redis = redis
        self.token = token or None
        self._logged: set[Skipped] = set()

    @staticmethod
    def _key(kind: str, replica_id: str) -> str:
        return keys.replica(kind, replica_id)

    async def announce(self, info: ReplicaInfo, ttl_s: float) -> None:
        now = time.time()
        entry: dict[str, Any] = {**asdict(info), "seen": now, "expires": now + ttl_s}
        if self.token is not None:
            entry[SIGNATURE] = sign(entry, self.token)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(info.kind, info.id), canonical(entry), px=int(ttl_s * 1000))
            pipe.sadd(keys.replicas(info.kind), info.id)
            await pipe.execute()

    async def withdraw(self, kind: str, replica_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(kind, replica_id))
            pipe.srem(keys.replicas(kind), replica_id)
            await pipe.execute()

    async def entries(self, kind: str) -> tuple[list[ReplicaInfo], list[Skipped]]:
        """(believed replicas, entries skipped with the reason). Ids whose entry expired are pruned."""
        ids = sorted(i.decode(errors="replace") for i in await self.redis.smembers(keys.replicas(kind)))
        if not ids:
            return [], []
        values = await self.redis.mget([self._key(kind, i) for i in ids])
        live, skipped = [], []
        now = time.time()
        for replica_id, raw in zip(ids, values, strict=True):
            if raw is None:
                await self.redis.srem(keys.replicas(kind), replica_id)
                continue
            try:
                live.append(verify(raw, kind, replica_id, self.token, now))
            except InvalidEntry as exc:
                skipped.append(self._skip(Skipped(kind, replica_id[:80], str(exc))))
        return live, skipped

    async def replicas(self, kind: str) -> list[ReplicaInfo]:
        """Live, authenticated replicas of a kind."""
        return (await self.entries(kind))[0]

    def _skip(self, skipped: Skipped) -> Skipped:
        if skipped not in self._logged:  # once per entry and reason, not on every lookup
            self._logged.add(skipped)
            log.warning("registry: skipping %s entry %r: %s", skipped.kind, skipped.id, skipped.reason)
        return skipped
