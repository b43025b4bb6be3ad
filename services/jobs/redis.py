"""The one way a process connects to Redis: every queue, registry and cache of a process shares the
client this returns (redis-py keeps a connection pool inside it)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis


def connect(url: str, *, block_ms: int = 2000) -> aioredis.Redis:
    # socket_timeout must outlast the longest blocking command (XREADGROUP BLOCK, BLPOP).
    return aioredis.Redis.from_url(
        url, decode_responses=False, socket_timeout=block_ms / 1000 + 10, health_check_interval=30
    )


def redacted(url: str) -> str:
    """The URL with its password replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
