"""The services on a real CUDA GPU (make test-gpu): default dtypes, numerics against fp32, NVML status,
the VAE's out-of-memory fallback to tiles, and batching on the device."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient, Client
from luna_stack.gpu.nvml import nvml_status
from luna_stack.vae.family import build as build_vae
from luna_stack.vae.model import load_vae

from .conftest import make_settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VAE = "vae/sd15-small-vae.safetensors"
FLUX_VAE = "vae/flux-small-ae.safetensors"  # 16 latent channels
VAES = [(VAE, 4), (FLUX_VAE, 16)]


def gpu_settings(models: Path, **env: str):
    return make_settings(models, LUNA_DEVICE="auto", LUNA_DTYPE="auto", **env)


@pytest.mark.parametrize(("vae", "channels"), VAES)
def test_vae_defaults_to_bf16_on_the_gpu_and_stays_close_to_fp32(
    models_dir: Path, start_service, vae: str, channels: int
) -> None:
    svc = start_service(build_vae, gpu_settings(models_dir))
    latent = torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with Client("vae", url=svc.url) as client:
        out, _ = client.call("decode", {"latent": latent}, {"model": vae})
        status = client.status()
    assert status["device"] == "cuda:0" and status["dtype"] == "bf16"
    reference = load_vae("ref", models_dir / vae, torch.device("cpu"), torch.float32).decode(latent)
    err = (out["image"] - reference).abs()
    assert err.mean() < 0.01 and err.max() < 0.2, (err.mean(), err.max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vae_half_precisions_against_fp32_on_the_gpu(models_dir: Path, dtype: torch.dtype) -> None:
    device = torch.device("cuda:0")
    fp32 = load_vae("a", models_dir / VAE, device, torch.float32)
    half = load_vae("b", models_dir / VAE, device, dtype)
    latent = torch.randn(1, 4, 64, 64, device=device, generator=torch.Generator(device).manual_seed(1))
    ref, out = fp32.decode(latent), half.decode(latent)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (5e-3 if dtype == torch.float16 else 2e-2), rel


def test_nvml_status_reports_this_gpu(models_dir: Path, start_service) -> None:
    svc = start_service(build_vae, gpu_settings(models_dir, LUNA_VAE_PRELOAD=VAE))
    with Client("vae", url=svc.url) as client:
        status = client.status()
    gpus = status["gpu"]["gpus"]
    assert status["gpu"]["available"] is True and gpus
    assert status["gpu_uuid"] in {g["uuid"] for g in gpus}
    mine = next(g for g in gpus if g["uuid"] == status["gpu_uuid"])
    assert 0 < mine["memory_used_bytes"] <= mine["memory_total_bytes"]
    assert nvml_status()["available"] is True


@pytest.mark.parametrize(("vae", "channels"), VAES)
def test_vae_out_of_memory_falls_back_to_tiles(
    models_dir: Path, start_service, vae: str, channels: int
) -> None:
    svc = start_service(build_vae, gpu_settings(models_dir, LUNA_VAE_PRELOAD=vae, LUNA_VAE_TILE_SIZE="512"))
    latent = torch.randn(1, channels, 512, 512, generator=torch.Generator().manual_seed(2))  # a 4096² image
    hog = []
    spare = 1.25 * 2**30
    try:
        free, _total = torch.cuda.mem_get_info()
        # Leave 1.25 GiB: enough for 512-pixel tiles and the 200 MB result, too little for the
        # 2 GiB first activation of a whole 4096² decode.
        while free > spare + 2**20:
            hog.append(torch.empty(int(min(free - spare, 2**30)), dtype=torch.uint8, device="cuda"))
            free, _ = torch.cuda.mem_get_info()
        with Client("vae", url=svc.url) as client:
            out, _ = client.call("decode", {"latent": latent}, {"model": vae})
            status = client.status()
    finally:
        hog.clear()
        torch.cuda.empty_cache()
    assert status["oom_fallbacks"] == 1
    assert out["image"].shape == (1, 4096, 4096, 3) and bool(torch.isfinite(out["image"]).all())


async def test_concurrent_decodes_batch_on_the_gpu(models_dir: Path, start_service) -> None:
    svc = start_service(
        build_vae, gpu_settings(models_dir, LUNA_VAE_PRELOAD=VAE, LUNA_VAE_MAX_DELAY_MS="200")
    )
    latents = [torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(6)]
    clients = [AsyncClient("vae", url=svc.url, name=f"c{i}") for i in range(6)]
    try:
        singles = [
            (await clients[0].call("decode", {"latent": z}, {"model": VAE}))[0]["image"] for z in latents
        ]
        merged = await asyncio.gather(
            *(c.call("decode", {"latent": z}, {"model": VAE}) for c, z in zip(clients, latents, strict=True))
        )
    finally:
        for c in clients:
            await c.close()
    assert svc.service.batcher.largest_batch >= 3
    for (out, _), single in zip(merged, singles, strict=True):
        # bf16 kernels may differ with the batch size; rows must still be each caller's own.
        assert (out["image"] - single).abs().mean() < 2e-3


@pytest.mark.parametrize(("precision", "bound"), [("fp16", 5e-3), ("bf16", 6e-2), ("fp8", 0.15)])
def test_unet_precisions_against_fp32_on_the_gpu(models_dir: Path, precision: str, bound: float) -> None:
    from luna_stack.unet.loader import load_diffusion_model
    from luna_stack.unet.step import unet_forward

    from .test_unet_support import step_inputs

    device = torch.device("cuda:0")
    path = models_dir / "checkpoints" / "sdxl-small.safetensors"
    ref = load_diffusion_model("ref", path, "fp32", device)
    model = load_diffusion_model("m", path, precision, device)
    inputs = {k: v.to(device) for k, v in step_inputs(ref.module, 2, 16, 16, seed=3).items()}
    with torch.inference_mode():
        expected = unet_forward(ref.module, **inputs)
        got = unet_forward(model.module, **{k: v.to(model.dtype) for k, v in inputs.items()}).float()
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < bound, err
    if precision == "fp8":
        assert model.nbytes < 0.55 * ref.nbytes / 2  # e4m3 storage: about half of fp16
