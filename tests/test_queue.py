"""The durable job queue with real Redis and real VAE replicas: late workers, SIGKILL, sharing, expiry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.jobs.registry import Registry
from luna_stack.vae.family import build
from luna_stack.wire.errors import UnknownJob

from .conftest import free_port, make_settings

VAE = "vae/sd15-small-vae.safetensors"


def _latent(seed: int, size: int = 8) -> torch.Tensor:
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))


async def test_job_submitted_before_any_worker_completes_when_one_starts(
    models_dir: Path, redis_url: str, start_service
) -> None:
    async with AsyncClient("vae", redis_url=redis_url) as client:
        job = await client.submit("decode", {"latent": _latent(1)}, {"model": VAE})
        await asyncio.sleep(0.3)
        assert (await JobQueue(connect(redis_url), "vae").state(job))["state"] == "queued"
        svc = start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url))
        out, params = await client.wait(job, timeout_s=60)
    direct, _ = await AsyncClient("vae", url=svc.url).call("decode", {"latent": _latent(1)}, {"model": VAE})
    assert torch.equal(out["image"], direct["image"])
    assert params["model"] == VAE


async def test_failed_job_carries_its_error(models_dir: Path, redis_url: str, start_service) -> None:
    start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url))
    async with AsyncClient("vae", redis_url=redis_url) as client:
        job = await client.submit("decode", {"latent": torch.randn(1, 3, 8, 8)}, {"model": VAE})
        with pytest.raises(Exception, match="this latent has 3 channels") as info:
            await client.wait(job, timeout_s=60)
        assert info.value.status == 400


def _serve_process(
    models_dir: Path, redis_url: str, claim_idle_ms: int
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "LUNA_MODEL_ROOTS": str(models_dir),
        "LUNA_REDIS_URL": redis_url,
        "LUNA_PORT": str(port),
        "LUNA_DEVICE": "cpu",
        "LUNA_DTYPE": "fp32",
        "LUNA_CLAIM_IDLE_MS": str(claim_idle_ms),
        "LUNA_VAE_PRELOAD": VAE,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "luna_stack.cli", "serve", "vae"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port


async def test_job_of_a_sigkilled_worker_is_completed_by_another(
    models_dir: Path, redis_url: str, start_service
) -> None:
    proc, _port = _serve_process(models_dir, redis_url, claim_idle_ms=1500)
    redis = connect(redis_url)
    queue = JobQueue(redis, "vae")
    try:
        deadline = time.monotonic() + 60
        while not await Registry(redis).replicas("vae"):
            assert time.monotonic() < deadline and proc.poll() is None, "worker process did not come up"
            await asyncio.sleep(0.1)
        # A big tiled decode keeps the worker busy for seconds on a CPU.
        latent = _latent(2, size=96)
        params = {"model": VAE, "tile_x": 16, "overlap": 4}
        async with AsyncClient("vae", redis_url=redis_url) as client:
            job = await client.submit("decode_tiled", {"latent": latent}, params)
            while (await queue.state(job))["state"] != "running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert (await queue.state(job))["state"] == "running"  # left pending, not lost
            survivor = start_service(
                build, make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_CLAIM_IDLE_MS="1500")
            )
            out, _ = await client.wait(job, timeout_s=120)
        info = await queue.state(job)
        assert info["state"] == "done" and int(info["attempts"]) == 2
        assert info["worker"] == survivor.service.replica_id
        direct, _ = await AsyncClient("vae", url=survivor.url).call(
            "decode_tiled", {"latent": latent}, params
        )
        assert torch.equal(out["image"], direct["image"])
    finally:
        if proc.poll() is None:
            proc.kill()
        await redis.aclose()


async def test_two_replicas_share_one_queue(models_dir: Path, redis_url: str, start_service) -> None:
    replicas = [
        start_service(
            build,
            make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_VAE_MAX_BATCH="1", LUNA_VAE_PRELOAD=VAE),
        )
        for _ in range(2)
    ]
    async with AsyncClient("vae", redis_url=redis_url) as client:
        live = await client.replicas()
        assert sorted(r.id for r in live) == sorted(r.service.replica_id for r in replicas)
        jobs = [
            await client.submit("decode", {"latent": _latent(i, size=32)}, {"model": VAE}) for i in range(8)
        ]
        results = [await client.wait(j, timeout_s=120) for j in jobs]
    queue = JobQueue(connect(redis_url), "vae")
    workers = {(await queue.state(j))["worker"] for j in jobs}
    assert workers == {r.service.replica_id for r in replicas}, "both replicas must have taken jobs"
    assert all(out["image"].shape == (1, 256, 256, 3) for out, _ in results)
    # Clients that only know Redis find a replica through the registry.
    async with AsyncClient("vae", redis_url=redis_url) as client:
        status = await client.status()
    assert status["replica"] in workers


async def test_results_expire(models_dir: Path, redis_url: str, start_service) -> None:
    start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_RESULT_TTL_S="1"))
    async with AsyncClient("vae", redis_url=redis_url) as client:
        job = await client.submit("decode", {"latent": _latent(3)}, {"model": VAE})
        await client.wait(job, timeout_s=60)
        await asyncio.sleep(2.2)
        with pytest.raises(UnknownJob, match="expired"):
            await client.wait(job, timeout_s=1)


async def test_http_jobs_api(models_dir: Path, redis_url: str, start_service) -> None:
    svc = start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url))
    async with AsyncClient("vae", url=svc.url) as client:  # no Redis on the client: jobs go over HTTP
        job = await client.submit("decode", {"latent": _latent(4)}, {"model": VAE})
        out, _ = await client.wait(job, timeout_s=60)
        assert out["image"].shape == (1, 64, 64, 3)
        with pytest.raises(UnknownJob):
            await client.wait("0" * 32, timeout_s=1)
