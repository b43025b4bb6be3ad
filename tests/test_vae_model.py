"""VaeModel behaviour that needs no server: fp16 overflow handling and ComfyUI's encode crop."""

from __future__ import annotations

from pathlib import Path

import torch

from luna_stack.vae.model import crop_to_multiple, load_vae


def test_fp16_overflow_upcasts_to_fp32_and_recomputes(models_dir: Path) -> None:
    path = models_dir / "vae" / "sd15-small-vae.safetensors"
    model = load_vae("fp16", path, torch.device("cpu"), torch.float16)
    reference = load_vae("ref", path, torch.device("cpu"), torch.float16)
    with torch.no_grad():  # make the decoder overflow fp16 the way the SDXL VAE does
        for m in (reference, model):
            m.vae.decoder.conv_out.weight.mul_(1e5)
    # The reference: the same fp16-rounded weights, computed in fp32.
    torch.nn.Module.to(reference.vae, torch.float32)
    reference.dtype = torch.float32
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        raw16 = model.vae.decode(latent.half()).sample
    assert not bool(torch.isfinite(raw16).all()), "the scaled decoder must overflow in fp16"
    image = model.decode(latent)
    assert model.upcast and model.dtype == torch.float32
    assert model.describe()["dtype"] == "fp32" and model.describe()["upcast"] is True
    assert bool(torch.isfinite(image).all())
    assert torch.equal(image, reference.decode(latent))


def test_bf16_model_runs_and_stays_close_to_fp32(models_dir: Path) -> None:
    path = models_dir / "vae" / "sd15-small-vae.safetensors"
    fp32 = load_vae("a", path, torch.device("cpu"), torch.float32)
    bf16 = load_vae("b", path, torch.device("cpu"), torch.bfloat16)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out32, out16 = fp32.decode(latent), bf16.decode(latent)
    assert out16.dtype == torch.float32 and not bf16.upcast
    assert (out16 - out32).abs().mean() < 0.02


def test_crop_matches_comfyui_centre_crop() -> None:
    image = torch.arange(1 * 13 * 18 * 4, dtype=torch.float32).reshape(1, 13, 18, 4)
    cropped = crop_to_multiple(image)
    assert cropped.shape == (1, 8, 16, 3)
    assert torch.equal(cropped, image[:, 2:10, 1:17, :3])
