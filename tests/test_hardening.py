"""A shared service is as good as its worst client: each attack below gets its 4xx quickly, before any
work, while another client's well-formed request completes within a stated bound; abandoned work is
dropped; a stalled body times out; one client cannot hold every slot; SIGTERM ends a service that is
computing within seconds. Run with -s to see each attack's status and time to answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.clip.family import build as build_clip
from luna_stack.devtools.embedded import free_port
from luna_stack.unet.family import build as build_unet
from luna_stack.vae.family import build as build_vae
from luna_stack.wire import codec
from luna_stack.wire.errors import LunaError

from .conftest import make_settings

VAE = "vae/sd15-small-vae.safetensors"
UNET = "checkpoints/sd15-small.safetensors"
CLIP = "checkpoints/sd15-small.safetensors"
ANSWER_S = 2.0  # a refused request is answered within this, before any work
OTHERS_S = 20.0  # a well-formed request from another client completes within this meanwhile
BLOB = codec.CONTENT_TYPE


def _step(rows: int, size: int) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(rows, 4, size, size),
        "timesteps": torch.full((rows,), 500.0),
        "context": torch.randn(rows, 77, 32),
    }


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, ctype: str = BLOB
) -> tuple[int, dict, float]:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": ctype}) as resp:
        raw = await resp.read()
        elapsed = time.perf_counter() - started
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {}
        return resp.status, parsed, elapsed


@pytest.fixture
def stack(models_dir: Path, start_service):
    settings = make_settings(models_dir, LUNA_READ_TIMEOUT_S="1", LUNA_MAX_CLIENT_REQUESTS="2")
    return {
        "vae": start_service(build_vae, settings),
        "unet": start_service(build_unet, settings),
        "clip": start_service(build_clip, settings),
    }


ATTACKS = {
    "vae decode 1x4x1024x1024": ("vae", "decode", {"latent": torch.zeros(1, 4, 1024, 1024)}, {"model": VAE}),
    "vae decode 64x4x128x128": ("vae", "decode", {"latent": torch.zeros(64, 4, 128, 128)}, {"model": VAE}),
    "vae tiled decode tile 4 overlap 0": (
        "vae",
        "decode_tiled",
        {"latent": torch.zeros(1, 4, 256, 256)},
        {"model": VAE, "tile_x": 4, "overlap": 0},
    ),
    "vae tiled decode infinite tile": (
        "vae",
        "decode_tiled",
        {"latent": torch.zeros(1, 4, 16, 16)},
        {"model": VAE, "tile_x": 1e308},
    ),
    "vae dict request_id": (
        "vae",
        "decode",
        {"latent": torch.zeros(1, 4, 8, 8)},
        {"model": VAE, "request_id": {}},
    ),
    "unet step 1x4x1024x1024": ("unet", "step", _step(1, 1024), {"model": UNET}),
    "unet step 16x4x256x256": ("unet", "step", _step(16, 256), {"model": UNET}),
    "unet step latent 2x2": ("unet", "step", _step(1, 2), {"model": UNET}),
    "clip 10 MiB prompt": ("clip", "encode", {}, {"model": CLIP, "text": "a cat " * ((10 << 20) // 6)}),
    "clip 200 LoRAs": ("clip", "encode", {}, {"model": CLIP, "text": "x", "lora": [{"name": "x"}] * 200}),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_each_attack_is_refused_quickly_while_others_are_served(stack, attack: str) -> None:
    kind, op, tensors, params = ATTACKS[attack]
    body = codec.encode(tensors, params)
    good = AsyncClient("vae", url=stack["vae"].url, name="bystander")
    async with aiohttp.ClientSession() as session, good:
        bystander = asyncio.create_task(
            good.call("decode", {"latent": torch.randn(1, 4, 16, 16)}, {"model": VAE})
        )
        status, reply, elapsed = await _post(session, f"{stack[kind].url}/v1/{kind}/{op}", body)
        started = time.perf_counter()
        out, _ = await asyncio.wait_for(bystander, OTHERS_S)
        error = reply["error"]
        print(f"\n{attack}: {status} {error['code']} in {elapsed * 1000:.0f} ms: {error['message']}")
    assert 400 <= status < 500, reply
    assert elapsed < ANSWER_S
    assert out["image"].shape == (1, 128, 128, 3) and time.perf_counter() - started < OTHERS_S


@pytest.mark.parametrize(
    ("name", "body", "ctype"),
    [
        ("non-UTF-8 JSON", b'{"model": "\xff\xfe"}', "application/json"),
        ("deeply nested JSON", b"[" * 100_000, "application/json"),
        ("5000-digit integer", b'{"model": ' + b"9" * 5000 + b"}", "application/json"),
        ("NaN in JSON", b'{"tile_x": NaN}', "application/json"),
        ("nested params in a blob", b"", BLOB),
    ],
)
async def test_malformed_json_is_a_400_naming_the_problem(stack, name: str, body: bytes, ctype: str) -> None:
    if ctype == BLOB:  # params 40 levels deep inside a valid safetensors blob
        deep: object = 1
        for _ in range(40):
            deep = [deep]
        body = codec.encode({}, {"model": VAE, "x": deep})
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/vae/decode", "/v1/vae/load", "/v1/ipc/buffers"):
            status, reply, elapsed = await _post(session, stack["vae"].url + path, body, ctype)
            assert status == 400 and reply["error"]["code"] == "invalid_body", (path, reply)
    print(f"\n{name}: 400 invalid_body in {elapsed * 1000:.0f} ms: {reply['error']['message']}")


async def test_odd_job_ids_and_unknown_routes_are_4xx(
    stack, models_dir: Path, redis_url: str, start_service
) -> None:
    queued = start_service(build_vae, make_settings(models_dir, LUNA_REDIS_URL=redis_url))
    async with aiohttp.ClientSession() as session:
        for path in (
            "/v1/jobs/abc:done",
            "/v1/jobs/" + "a" * 5000,
            "/v1/jobs/0123456789abcdef0123456789abcdef",
        ):
            async with session.get(queued.url + path) as resp:
                assert resp.status == 404, path
        async with session.get(stack["vae"].url + "/v1/jobs/0123456789abcdef0123456789abcdef") as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "no_queue"


async def test_a_stalled_body_times_out_and_frees_its_slot(stack) -> None:
    """A body that declares 400 MiB and sends 10 bytes is answered 408 after read_timeout_s (1 s here)."""
    host, port = stack["vae"].url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/vae/decode HTTP/1.1\r\nHost: {host}\r\nContent-Type: {BLOB}\r\n"
        f"Content-Length: {400 << 20}\r\nX-Luna-Client: slow\r\n\r\n"
    )
    started = time.perf_counter()
    writer.write(head.encode() + b"0123456789")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    elapsed = time.perf_counter() - started
    writer.close()
    print(f"\nstalled 400 MiB body: {status_line.decode().strip()} after {elapsed:.1f} s")
    assert b" 408 " in status_line and 0.9 < elapsed < 5


async def test_one_client_cannot_hold_more_than_its_share(stack) -> None:
    """max_client_requests=2: a third concurrent request of the same client is refused (429) at once; the
    stalled ones end at the read timeout, and another client is served meanwhile."""
    host, port = stack["vae"].url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                f"POST /v1/vae/decode HTTP/1.1\r\nHost: {host}\r\nContent-Type: {BLOB}\r\n"
                f"Content-Length: 1000\r\nX-Luna-Client: greedy\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        stalled.append((reader, writer))
    await asyncio.sleep(0.2)  # both requests are in their handlers, reading
    body = codec.encode({"latent": torch.randn(1, 4, 8, 8)}, {"model": VAE})
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(
            stack["vae"].url + "/v1/vae/decode",
            data=body,
            headers={"Content-Type": BLOB, "X-Luna-Client": "greedy"},
        ) as resp:
            assert resp.status == 429 and (await resp.json())["error"]["code"] == "too_many_requests"
            assert time.perf_counter() - started < ANSWER_S
        async with session.post(
            stack["vae"].url + "/v1/vae/decode",
            data=body,
            headers={"Content-Type": BLOB, "X-Luna-Client": "other"},
        ) as resp:
            assert resp.status == 200
    for _reader, writer in stalled:
        writer.close()


async def test_abandoned_requests_are_dropped_before_they_run(stack) -> None:
    """Twenty clients send a decode and disconnect at once; none of them is computed once its client is
    gone, and the next valid request is answered promptly (it waited 17-23 s before)."""
    service = stack["vae"].service
    batches_before = service.batcher.batches
    body = codec.encode({"latent": torch.randn(2, 4, 128, 128)}, {"model": VAE})
    host, port = stack["vae"].url.removeprefix("http://").split(":")
    for i in range(20):
        with socket.create_connection((host, int(port))) as sock:
            head = (
                f"POST /v1/vae/decode HTTP/1.1\r\nHost: {host}\r\nContent-Type: {BLOB}\r\n"
                f"Content-Length: {len(body)}\r\nX-Luna-Client: leaver-{i}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
    started = time.perf_counter()
    async with AsyncClient("vae", url=stack["vae"].url, name="after") as client:
        out, _ = await client.call("decode", {"latent": torch.randn(1, 4, 16, 16)}, {"model": VAE})
    elapsed = time.perf_counter() - started
    computed = service.batcher.batches - batches_before - 1
    status = await AsyncClient("vae", url=stack["vae"].url).status()
    print(f"\n20 abandoned decodes: {computed} batches computed for them; next request in {elapsed:.2f} s")
    assert out["image"].shape == (1, 128, 128, 3)
    assert computed <= 2 and elapsed < 10
    assert status["requests"]["client_gone"] >= 18


def test_sigterm_stops_a_computing_service_within_seconds(models_dir: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "LUNA_MODEL_ROOTS": str(models_dir),
        "LUNA_PORT": str(port),
        "LUNA_DEVICE": "cpu",
        "LUNA_DTYPE": "fp32",
        "LUNA_VAE_PRELOAD": VAE,
    }
    env.pop("LUNA_REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "luna_stack.cli", "serve", "vae"], env=env, stderr=subprocess.PIPE
    )
    try:
        asyncio.run(_start_a_long_tiled_decode(f"http://127.0.0.1:{port}"))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nSIGTERM during a tiled decode: exited {proc.returncode} after {elapsed:.1f} s")
    assert elapsed < 8


async def _start_a_long_tiled_decode(url: str) -> None:
    async with AsyncClient("vae", url=url) as client:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(LunaError):
                if (await client.get_json("/health/ready"))["ready"]:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        params = {"model": VAE, "tile_x": 32, "overlap": 4, "request_id": "long"}
        task = asyncio.create_task(
            client.call("decode_tiled", {"latent": torch.randn(2, 4, 160, 160)}, params)
        )
        while True:  # the decode is running once its first tile reports progress
            await asyncio.sleep(0.1)
            assert not task.done(), task.exception()
            with contextlib.suppress(LunaError):
                if (await client.get_json("/v1/progress/long"))["done"] >= 1:
                    break
            assert time.monotonic() < deadline
        task.cancel()


async def test_resident_models_are_bounded_least_recently_used_first(models_dir: Path, start_service) -> None:
    svc = start_service(build_vae, make_settings(models_dir, LUNA_MAX_MODELS="2", LUNA_VAE_PRELOAD=VAE))
    async with AsyncClient("vae", url=svc.url) as client:
        names = [VAE, "checkpoints/sd15-small.safetensors", "checkpoints/sdxl-small.safetensors"]
        for name in names[1:]:
            out, _ = await client.call("decode", {"latent": torch.randn(1, 4, 8, 8)}, {"model": name})
            assert out["image"].shape == (1, 64, 64, 3)
        loaded = [m["name"] for m in (await client.status())["models"]]
    assert len(loaded) == 2 and VAE in loaded and names[2] in loaded  # the preloaded one stays
    assert svc.service.resident.evictions == 1


async def test_the_unauthenticated_login_form_is_bounded(models_dir: Path, start_service) -> None:
    """The status page's login needs no token, so it reads at most a few KiB: a 10 MiB form is refused
    while it streams, and a malformed one is a 400."""
    svc = start_service(build_vae, make_settings(models_dir, LUNA_TOKEN="t" * 32))
    form = "application/x-www-form-urlencoded"
    async with aiohttp.ClientSession() as session:
        status, reply, elapsed = await _post(session, svc.url + "/login", b"token=" + b"x" * (10 << 20), form)
        assert status == 413 and reply["error"]["code"] == "payload_too_large" and elapsed < ANSWER_S
        status, reply, _ = await _post(session, svc.url + "/login", b"token=\xff\xfe", form)
        assert status == 400 and reply["error"]["code"] == "invalid_body"
        status, _reply, _ = await _post(session, svc.url + "/login", b"token=wrong", form)
        assert status == 401
