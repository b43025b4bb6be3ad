"""Every Redis key Luna Stack uses, in one place (job queues, results, the registry, LoRA and
conditioning caches). Changing a name here changes it for every replica and client at once."""

from __future__ import annotations

PREFIX = "luna:"
JOB_GROUP = b"workers"  # the consumer group every replica of a kind reads its stream with
LORA_PREFIX = f"{PREFIX}lora:"
COND_CACHE_PREFIX = f"{PREFIX}clip:cond:"


def job_stream(kind: str) -> bytes:
    """The stream of queued jobs of one service kind."""
    return f"{PREFIX}jobs:{kind}".encode()


def job(job_id: str, suffix: str = "") -> str:
    """A job's state hash (suffix ''), request blob (':in'), result (':out') and wake-up list (':done')."""
    return f"{PREFIX}job:{job_id}{suffix}"


def replica(kind: str, replica_id: str) -> str:
    """One replica's registry entry (a JSON value with a heartbeat TTL)."""
    return f"{PREFIX}replica:{kind}:{replica_id}"


def replicas(kind: str) -> str:
    """The set of replica ids announced for a kind (entries whose TTL ran out are pruned on read)."""
    return f"{PREFIX}replicas:{kind}"
