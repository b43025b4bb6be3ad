"""Every Redis key Luna Stack uses, in one place (job queues, results, the registry, LoRA and
conditioning caches). Changing a name here changes it for every replica and client at once.

Which keys may be evicted: the local-mode redis-server runs with `maxmemory-policy volatile-lru`, under
which Redis only ever evicts keys that carry a TTL. So caches carry TTLs (conditioning entries, registry
heartbeats, per-replica LoRA keys) and queue keys never do: a job's stream entry, state hash, input,
result and wake-up list are persisted, and the queue itself deletes them when their time is up (the
expiry index `job_expiry`, swept by the workers). A full Redis then refuses new jobs instead of
dropping queued ones.
"""

from __future__ import annotations

PREFIX = "luna:"
JOB_GROUP = b"workers"  # the consumer group every replica of a kind reads its stream with
LORA_PREFIX = f"{PREFIX}lora:"
COND_CACHE_PREFIX = f"{PREFIX}clip:cond:"
COND_CACHE_STATS = f"{COND_CACHE_PREFIX}stats"  # hit/miss counters of every replica (no TTL, tiny)


def job_stream(kind: str) -> bytes:
    """The stream of queued jobs of one service kind."""
    return f"{PREFIX}jobs:{kind}".encode()


def job_expiry(kind: str) -> str:
    """Sorted set of a kind's job ids by the time their keys are due to go (no Redis TTL on job keys)."""
    return f"{PREFIX}jobs:{kind}:expiry"


def job(job_id: str, suffix: str = "") -> str:
    """A job's state hash (suffix ''), request blob (':in'), result (':out') and wake-up list (':done')."""
    return f"{PREFIX}job:{job_id}{suffix}"


def cond_cache(digest: str) -> str:
    """One conditioning cache entry (a safetensors blob with a TTL)."""
    return f"{COND_CACHE_PREFIX}{digest}"


def replica(kind: str, replica_id: str) -> str:
    """One replica's registry entry (a JSON value with a heartbeat TTL)."""
    return f"{PREFIX}replica:{kind}:{replica_id}"


def replicas(kind: str) -> str:
    """The set of replica ids announced for a kind (entries whose TTL ran out are pruned on read)."""
    return f"{PREFIX}replicas:{kind}"
