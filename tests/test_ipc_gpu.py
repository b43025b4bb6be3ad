"""CUDA IPC between a client (this test process) and services running as their own processes, on a real
GPU (make test-gpu): same results as HTTP, buffers exported once, memory flat over 10,000 requests, a
client killed mid-request harms nobody, and every case where IPC cannot work falls back to HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.gpu.nvml import nvml_status
from luna_stack.vae.family import build as build_vae
from luna_stack.wire.errors import BadRequest, UnknownIpcBuffer

from .conftest import make_settings
from .test_unet_support import ldm_unet, reference_unet, step_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VAE = "vae/sd15-small-vae.safetensors"
UNET = "checkpoints/sd15-small.safetensors"
CLIP = "sdxl-small.safetensors"
GPU = {"LUNA_DEVICE": "cuda:0", "LUNA_DTYPE": "fp32"}


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as resp:
        return json.load(resp)


def process_gpu_bytes(pid: int) -> int:
    gpu = nvml_status()["gpus"][0]
    return next(p["used_bytes"] for p in gpu["processes"] if p["pid"] == pid)


@pytest.fixture(scope="module")
def unet_ref(models_dir: Path):
    return reference_unet(ldm_unet(models_dir / UNET), "sd15")


async def test_vae_unet_clip_over_ipc_equal_http(models_dir: Path, serve_process, unet_ref) -> None:
    vae = serve_process("vae", models_dir, **GPU)
    unet = serve_process("unet", models_dir, **GPU)
    clip = serve_process("clip", models_dir, **GPU)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 16, 16, generator=gen)
    inputs = step_inputs(unet_ref, batch=2, seed=3)
    prompt = {"model": CLIP, "text": "a red fox in the snow"}
    async with (
        AsyncClient("vae", url=vae.url, name="ipc-vae") as v,
        AsyncClient("vae", url=vae.url, ipc="off") as v_http,
        AsyncClient("unet", url=unet.url, name="ipc-unet") as u,
        AsyncClient("unet", url=unet.url, ipc="off") as u_http,
        AsyncClient("clip", url=clip.url, name="ipc-clip") as c,
        AsyncClient("clip", url=clip.url, ipc="off") as c_http,
    ):
        for _ in range(3):  # repeated calls reuse the buffers registered by the first
            image, _ = await v.call("decode", {"latent": latent.cuda()}, {"model": VAE})
        image_http, _ = await v_http.call("decode", {"latent": latent}, {"model": VAE})
        assert image["image"].is_cuda and torch.equal(image["image"].cpu(), image_http["image"])
        back, _ = await v.call("encode", {"image": image["image"]}, {"model": VAE})
        back_http, _ = await v_http.call("encode", {"image": image_http["image"]}, {"model": VAE})
        assert torch.equal(back["latent"].cpu(), back_http["latent"])
        assert v.ipc.calls == 4

        gpu_inputs = {k: t.cuda() for k, t in inputs.items()}
        out, params = await u.call("step", gpu_inputs, {"model": UNET})
        out_http, _ = await u_http.call("step", inputs, {"model": UNET})
        assert out["out"].is_cuda and torch.equal(out["out"].cpu(), out_http["out"])
        assert params["batch_rows"] == 2 and "_ipc" not in params

        # CLIP takes text: outputs come to the GPU when asked for with device=.
        cond, _ = await c.call("encode", params=prompt, device="cuda")
        cond_http, _ = await c_http.call("encode", params=prompt)
        assert cond["cond"].is_cuda and torch.equal(cond["cond"].cpu(), cond_http["cond"])
        assert torch.equal(cond["pooled"].cpu(), cond_http["pooled"])
        assert c.ipc.calls == 1

    # Exported once: one input and one output buffer per client, closed when the client closed.
    vae_ipc = status(vae.url)["ipc"]
    assert vae_ipc["opened_total"] == 2 and vae_ipc["buffers"] == 0, vae_ipc
    assert status(unet.url)["ipc"]["opened_total"] == 2


async def test_outputs_larger_than_the_buffer_come_as_bytes_once_then_fit(models_dir, serve_process) -> None:
    vae = serve_process("vae", models_dir, **GPU)
    latent = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(1)).cuda()  # 768² image
    async with AsyncClient("vae", url=vae.url) as client:
        first, _ = await client.call("decode", {"latent": latent}, {"model": VAE})
        second, _ = await client.call("decode", {"latent": latent}, {"model": VAE})
        assert first["image"].is_cuda and torch.equal(first["image"], second["image"])
        assert first["image"].numel() * 4 > 1 << 20  # did not fit the first 1 MiB output buffer
        ipc = status(vae.url)["ipc"]
        assert ipc["opened_total"] == 3 and ipc["buffers"] == 2  # the output buffer grew once


async def test_memory_stays_flat_over_ten_thousand_requests(models_dir, serve_process, unet_ref) -> None:
    unet = serve_process("unet", models_dir, **GPU)
    inputs = {k: t.cuda() for k, t in step_inputs(unet_ref, batch=2, seed=5).items()}
    clients = [AsyncClient("unet", url=unet.url, name=f"steady-{i}") for i in range(8)]
    first, _ = await clients[0].call("step", inputs, {"model": UNET})

    async def steps(client: AsyncClient, count: int) -> None:
        for _ in range(count):
            out, _ = await client.call("step", inputs, {"model": UNET})
        # Merged batches pick other (TF32) kernels: rounding differences only.
        assert (out["out"] - first["out"]).norm() / first["out"].norm() < 5e-3

    try:
        await asyncio.gather(*(steps(c, 100) for c in clients))  # every channel mapped, allocator warm
        before = process_gpu_bytes(unet.process.pid)
        started = time.perf_counter()
        await asyncio.gather(*(steps(c, 1250) for c in clients))  # 10,000 requests
        elapsed = time.perf_counter() - started
        after = process_gpu_bytes(unet.process.pid)
        ipc = status(unet.url)["ipc"]
    finally:
        for c in clients:
            await c.close()
    mib = 2**20
    print(f"10k IPC steps in {elapsed:.1f} s; service GPU memory {before / mib:.0f} -> {after / mib:.0f} MiB")
    # A per-request leak here would be a mapping or buffer (≥ 1 MiB each, ×10,000); allow the allocator a
    # new segment for a batch shape the warm-up did not meet.
    assert after - before <= 16 << 20, (before, after)
    assert ipc["opened_total"] == 16 and ipc["buffers"] == 16  # exported once per client, then reused


_DYING_CLIENT = """
import sys, torch
from luna_stack.client.http import Client
latent = torch.randn(4, 4, 128, 128, device="cuda")
with Client("vae", url=sys.argv[1], name="doomed") as client:
    client.call("decode", {"latent": latent}, {"model": sys.argv[2]})
    print("registered", flush=True)
    while True:
        client.call("decode", {"latent": latent}, {"model": sys.argv[2]})
"""


async def test_a_client_killed_mid_request_harms_nobody(models_dir, serve_process) -> None:
    vae = serve_process("vae", models_dir, LUNA_IPC_IDLE_S="4", **GPU)
    doomed = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_DYING_CLIENT), vae.url, VAE],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert doomed.stdout.readline().strip() == "registered"
        time.sleep(0.3)  # let it be inside a request
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        doomed.kill()
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    async with (
        AsyncClient("vae", url=vae.url, name="survivor") as client,
        AsyncClient("vae", url=vae.url, ipc="off") as http,
    ):
        out, _ = await client.call("decode", {"latent": latent.cuda()}, {"model": VAE})
        ref, _ = await http.call("decode", {"latent": latent}, {"model": VAE})
        assert torch.equal(out["image"].cpu(), ref["image"])
        deadline = time.monotonic() + 30
        while status(vae.url)["ipc"]["clients"] != 1:  # the dead client's buffers are unmapped
            assert time.monotonic() < deadline, status(vae.url)["ipc"]
            time.sleep(0.5)
        out, _ = await client.call("decode", {"latent": latent.cuda()}, {"model": VAE})
        assert torch.equal(out["image"].cpu(), ref["image"])
    assert vae.process.poll() is None


async def test_bad_ipc_requests_are_4xx_and_the_service_stays_up(models_dir, serve_process) -> None:
    vae = serve_process("vae", models_dir, **GPU)
    latent = torch.randn(1, 4, 16, 16, device="cuda")
    async with (
        AsyncClient("vae", url=vae.url, name="owner") as owner,
        AsyncClient("vae", url=vae.url, name="intruder", ipc="off") as intruder,
    ):
        await owner.call("decode", {"latent": latent}, {"model": VAE})
        channel = owner.ipc._channels[0]
        inputs, outputs = channel.inputs.id, channel.outputs.id
        good = [inputs, 0, "fp32", [1, 4, 16, 16]]
        cases = {
            "past the end": [inputs, 0, "fp32", [1, 4, 4096, 4096]],
            "misaligned": [inputs, 4, "fp32", [1, 4, 16, 16]],
            "unknown dtype": [inputs, 0, "complex64", [1, 4, 16, 16]],
            "negative shape": [inputs, 0, "fp32", [1, -4, 16, 16]],
            "not a list": {"buffer": inputs},
        }
        for case, where in cases.items():
            with pytest.raises(BadRequest):
                await owner._http_call(
                    "decode", {}, {"model": VAE, "_ipc": {"inputs": {"latent": where}, "out": outputs}}
                )
            print("rejected:", case)
        # Another client cannot use the owner's buffers, nor a made-up id.
        for who, spec in (
            (intruder, {"inputs": {"latent": good}, "out": outputs}),
            (owner, {"inputs": {"latent": good}, "out": "f" * 32}),
        ):
            with pytest.raises(UnknownIpcBuffer):
                await who._http_call("decode", {}, {"model": VAE, "_ipc": spec})
        out, _ = await owner.call("decode", {"latent": latent}, {"model": VAE})
        assert out["image"].is_cuda and torch.isfinite(out["image"]).all()


async def test_ipc_falls_back_to_http_with_the_reason(
    models_dir, serve_process, start_service, caplog
) -> None:
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cpu_service = serve_process("vae", models_dir, LUNA_DEVICE="cpu", LUNA_DTYPE="fp32")
    # The same process cannot open its own IPC handles: the service answers 409, the client uses HTTP.
    same_process = start_service(build_vae, make_settings(models_dir, **GPU))
    for url, reason in ((cpu_service.url, "not a GPU"), (same_process.url, "cuIpcOpenMemHandle")):
        caplog.clear()
        async with AsyncClient("vae", url=url) as client:
            out, _ = await client.call("decode", {"latent": latent.cuda()}, {"model": VAE})
            out2, _ = await client.call("decode", {"latent": latent.cuda()}, {"model": VAE})
            assert out["image"].is_cuda and torch.equal(out["image"], out2["image"])
            assert client.ipc.calls == 0
            assert reason in client.ipc.disabled_reason(torch.device("cuda", 0))
        warnings = [r for r in caplog.records if "CUDA IPC off" in r.getMessage()]
        assert len(warnings) == 1 and reason in warnings[0].getMessage()


def test_the_comfyui_pack_stages_host_tensors_through_ipc(models_dir, serve_process, unet_ref) -> None:
    """VAE and CLIP results stay host tensors for ComfyUI, but cross by CUDA IPC when its GPU is the
    service's; UNet steps (GPU tensors already) use IPC directly."""
    from comfy_nodes.remote import Services
    from comfy_nodes.settings import PackSettings

    vae = serve_process("vae", models_dir, **GPU)
    clip = serve_process("clip", models_dir, **GPU)
    unet = serve_process("unet", models_dir, **GPU)
    urls = {"vae": vae.url, "clip": clip.url, "unet": unet.url}
    staged = Services(PackSettings(urls, None, None), gpu=torch.device("cuda", 0))
    plain = Services(PackSettings(urls, None, None), gpu=torch.device("cpu"))
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    try:
        image = staged.vae_decode(VAE, latent)
        assert image.device.type == "cpu" and torch.equal(image, plain.vae_decode(VAE, latent))
        back = staged.vae_encode(VAE, image)
        assert back.device.type == "cpu" and torch.equal(back, plain.vae_encode(VAE, image))
        cond, pooled, _ = staged.clip_encode(CLIP, {"text": "a lighthouse at dusk"})
        ref_cond, ref_pooled, _ = plain.clip_encode(CLIP, {"text": "a lighthouse at dusk"})
        assert cond.device.type == "cpu" and torch.equal(cond, ref_cond) and torch.equal(pooled, ref_pooled)
        inputs = {k: t.cuda() for k, t in step_inputs(unet_ref, batch=2, seed=8).items()}
        out = staged.unet_step(UNET, inputs["x"], inputs["timesteps"], inputs["context"])
        assert out.is_cuda
        assert staged.client("vae").aio.ipc.calls == 2 and staged.client("clip").aio.ipc.calls == 1
        assert staged.client("unet").aio.ipc.calls == 1 and plain.client("vae").aio.ipc.calls == 0
    finally:
        staged.close()
        plain.close()
