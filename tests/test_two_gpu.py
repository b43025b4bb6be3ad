"""The two-GPU layout (compose/2gpu.env): CLIP alone on cuda:1, VAE and UNet on cuda:0. Services are
told their GPU by index, recognised by UUID; a client on cuda:0 uses CUDA IPC with VAE and UNet and
HTTP with CLIP (another GPU), saying why; the same client's cuda:1 tensors use IPC with CLIP."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.gpu.device import gpu_uuid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
VAE = "vae/sd15-small-vae.safetensors"
CLIP = "sdxl-small.safetensors"


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as resp:
        return json.load(resp)


async def test_clip_on_gpu1_vae_on_gpu0(models_dir, serve_process, caplog) -> None:
    caplog.set_level(logging.WARNING)
    clip = serve_process("clip", models_dir, LUNA_DEVICE="cuda:1", LUNA_DTYPE="fp32")
    vae = serve_process("vae", models_dir, LUNA_DEVICE="cuda:0", LUNA_DTYPE="fp32")
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    clip_status, vae_status = status(clip.url), status(vae.url)
    assert clip_status["device"] == "cuda:1" and clip_status["gpu_uuid"] == gpu_uuid(gpu1)
    assert vae_status["device"] == "cuda:0" and vae_status["gpu_uuid"] == gpu_uuid(gpu0)
    assert gpu_uuid(gpu0) != gpu_uuid(gpu1)
    assert {g["uuid"] for g in vae_status["gpu"]["gpus"]} >= {gpu_uuid(gpu0), gpu_uuid(gpu1)}

    prompt = {"model": CLIP, "text": "two lanterns over a river"}
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    async with (
        AsyncClient("clip", url=clip.url, name="two-gpu") as c,
        AsyncClient("clip", url=clip.url, ipc="off") as c_http,
        AsyncClient("vae", url=vae.url, name="two-gpu") as v,
        AsyncClient("vae", url=vae.url, ipc="off") as v_http,
    ):
        ref, _ = await c_http.call("encode", params=prompt)
        on_gpu0, _ = await c.call("encode", params=prompt, device=gpu0)  # another GPU: HTTP
        assert on_gpu0["cond"].device == gpu0 and torch.equal(on_gpu0["cond"].cpu(), ref["cond"])
        assert c.ipc.calls == 0 and "is not this client's" in c.ipc.disabled_reason(gpu0)
        on_gpu1, _ = await c.call("encode", params=prompt, device=gpu1)  # the service's GPU: IPC
        assert on_gpu1["cond"].device == gpu1 and torch.equal(on_gpu1["cond"].cpu(), ref["cond"])
        assert c.ipc.calls == 1

        image, _ = await v.call("decode", {"latent": latent.to(gpu0)}, {"model": VAE})
        image_ref, _ = await v_http.call("decode", {"latent": latent}, {"model": VAE})
        assert image["image"].device == gpu0 and torch.equal(image["image"].cpu(), image_ref["image"])
        assert v.ipc.calls == 1
    warnings = [r.getMessage() for r in caplog.records if "CUDA IPC off" in r.getMessage()]
    assert len(warnings) == 1 and "cuda:0" in warnings[0], warnings
