"""Redis is not a side door: registry entries nobody signed (or signed with another key, tampered with,
replayed, malformed) are skipped with a log line, and the client's bearer token never reaches them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from aiohttp import web

from luna_stack import cli
from luna_stack.client.http import AsyncClient
from luna_stack.devtools.embedded import free_port
from luna_stack.jobs.redis import connect
from luna_stack.jobs.registry import Registry, sign
from luna_stack.vae.family import build
from luna_stack.wire import keys

from .conftest import make_settings

VAE = "vae/sd15-small-vae.safetensors"
TOKEN = "registry-test-token"


class FakeReplica:
    """A tiny aiohttp server on 127.0.0.1 that answers everything and records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.authorization: list[str] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    async def _any(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        if "Authorization" in request.headers:
            self.authorization.append(request.headers["Authorization"])
        return web.json_response({"ready": True})

    async def __aenter__(self) -> FakeReplica:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def _entry(replica_id: str, address: str, **extra: object) -> dict[str, object]:
    now = time.time()
    return {
        "id": replica_id,
        "kind": "vae",
        "address": address,
        "gpu_uuid": None,
        "device": "cpu",
        "models": [VAE],
        "ipc": False,
        "load": {"queue": -1},  # looks idler than any real replica: a client would pick it first
        "started": now,
        "seen": now,
        "expires": now + 60,
        **extra,
    }


async def _plant(redis, entries: dict[str, bytes]) -> None:
    for replica_id, raw in entries.items():
        await redis.set(keys.replica("vae", replica_id), raw, ex=60)
        await redis.sadd(keys.replicas("vae"), replica_id)


async def test_fake_registry_entries_are_ignored_and_never_see_the_token(
    models_dir: Path, redis_url: str, start_service, caplog: pytest.LogCaptureFixture, capsys, tmp_path: Path
) -> None:
    real = start_service(
        build, make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_TOKEN=TOKEN, LUNA_VAE_PRELOAD=VAE)
    )
    redis = connect(redis_url)
    real_key = keys.replica("vae", real.service.replica_id)
    while not await redis.exists(real_key):  # the first heartbeat runs as the app starts
        await asyncio.sleep(0.02)
    async with FakeReplica() as fake:
        signed = json.loads(await redis.get(real_key))
        forged = {**signed, "id": "forged", "address": fake.address}  # the real signature, new address
        replayed = _entry("replayed", fake.address, expires=time.time() - 3600)
        replayed["sig"] = sign(replayed, TOKEN)
        wrong_key = _entry("wrong-key", fake.address)
        wrong_key["sig"] = sign(wrong_key, "another-token")
        # Malformed but signed with the right token: skipped for what is wrong in them.
        wrong_type = {**_entry("wrong-type", fake.address), "models": "all"}
        bad_address = _entry("bad-address", "127.0.0.1:8102/x@evil")
        for entry in (wrong_type, bad_address):
            entry["sig"] = sign(entry, TOKEN)
        planted = {
            "unsigned": json.dumps(_entry("unsigned", fake.address)).encode(),
            "forged": json.dumps(forged).encode(),
            "wrong-key": json.dumps(wrong_key).encode(),
            "replayed": json.dumps(replayed).encode(),
            "not-json": b"{not json",
            "not-an-object": b"[1, 2]",
            "wrong-type": json.dumps(wrong_type).encode(),
            "bad-address": json.dumps(bad_address).encode(),
        }
        await _plant(redis, planted)
        caplog.set_level(logging.WARNING, logger="luna_stack.jobs.registry")
        async with AsyncClient("vae", redis_url=redis_url, token=TOKEN) as client:
            assert [r.id for r in await client.replicas()] == [real.service.replica_id]
            for seed in range(3):
                latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
                out, _ = await client.call("decode", {"latent": latent}, {"model": VAE})
                assert out["image"].shape == (1, 64, 64, 3)
            job = await client.submit("decode", {"latent": torch.zeros(1, 4, 8, 8)}, {"model": VAE})
            await client.wait(job, timeout_s=60)
            status = await client.status()
        assert status["replica"] == real.service.replica_id
        logged = [r.getMessage() for r in caplog.records if "registry: skipping" in r.getMessage()]
        assert sorted(m.split("'")[1] for m in logged) == sorted(planted)  # once each, not per lookup

        # `luna-stack status` reads the same registry: the real replica's status, the rest skipped.
        assert await asyncio.to_thread(cli.status, [], TOKEN, tmp_path / "no-run", True, redis_url) == 0
        printed = json.loads(capsys.readouterr().out)
        assert fake.requests == [] and fake.authorization == []
    assert [s["url"] for s in printed["services"]] == [real.url]
    assert printed["services"][0]["status"]["replica"] == real.service.replica_id
    reasons = {s["id"]: s["reason"] for s in printed["registry_skipped"]}
    assert sorted(reasons) == sorted(planted)
    assert "unsigned" in reasons["unsigned"]
    assert "signature does not verify" in reasons["forged"] and "signature" in reasons["wrong-key"]
    assert "expired" in reasons["replayed"]
    assert reasons["not-json"] == "not JSON" and reasons["not-an-object"] == "not a JSON object"
    assert "models" in reasons["wrong-type"] and "host:port" in reasons["bad-address"]
    await redis.aclose()


async def test_without_a_token_only_loopback_entries_are_believed(
    models_dir: Path, redis_url: str, start_service
) -> None:
    real = start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_VAE_PRELOAD=VAE))
    redis = connect(redis_url)
    while not await redis.exists(keys.replica("vae", real.service.replica_id)):
        await asyncio.sleep(0.02)
    await _plant(
        redis,
        {
            "elsewhere": json.dumps(_entry("elsewhere", "10.255.255.1:8102")).encode(),
            "by-name": json.dumps(_entry("by-name", "evil.example:8102")).encode(),
            "bad-port": json.dumps(_entry("bad-port", "127.0.0.1:99999")).encode(),
        },
    )
    live, skipped = await Registry(redis).entries("vae")
    assert [r.id for r in live] == [real.service.replica_id]
    reasons = {s.id: s.reason for s in skipped}
    assert "non-loopback" in reasons["elsewhere"] and "non-loopback" in reasons["by-name"]
    assert "host:port" in reasons["bad-port"]
    async with AsyncClient("vae", redis_url=redis_url, token="") as client:
        assert [r.id for r in await client.replicas()] == [real.service.replica_id]
        out, _ = await client.call("decode", {"latent": torch.zeros(1, 4, 8, 8)}, {"model": VAE})
    assert out["image"].shape == (1, 64, 64, 3)
    stored = json.loads(await redis.get(keys.replica("vae", real.service.replica_id)))
    assert "sig" not in stored  # no token, nothing to sign with
    await redis.aclose()
