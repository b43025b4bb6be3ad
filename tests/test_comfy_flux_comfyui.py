"""Flux.1 parity with real ComfyUI: the same fixture file in ComfyUI's own Flux (comfy.ldm.flux) through
its model detection and supported-model config, called as its sampler calls it,
`diffusion_model(x, timestep, context, y, guidance, control)`, against the unet service's step on the
same inputs — with ControlNet residuals, odd latent sizes, and LoRA files ComfyUI's own LoRA loader
applies (kohya / BFL / diffusers-PEFT names).

ComfyUI's detection hard-codes Flux.1's 24 heads and RoPE axes [16, 56, 56] (comfy/model_detection.py);
comfy.sd.load_diffusion_model therefore loads only 3072-wide files. For these small files the two
values are given as the fixture has them; everything else is ComfyUI's own reading of the file.

Needs COMFYUI_PATH (see docs/comfyui.md); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures_flux import write_flux_lora
from luna_stack.unet.family import build
from luna_stack.unet.flux.layout import infer_config, module_map

from .comfyui_harness import COMFYUI_PATH, requires_comfyui
from .comfyui_import import import_comfyui
from .conftest import make_settings

pytestmark = requires_comfyui
RTOL = 1e-5  # max |ComfyUI - ours| / max |ComfyUI|, fp32 on the CPU
VARIANTS = {"dev": "unet/flux-dev-small.safetensors", "schnell": "unet/flux-schnell-small.safetensors"}
CPU = torch.device("cpu")


def comfy_flux(path: Path) -> Any:
    """ComfyUI's model_base.Flux for the file, fp32, weights loaded by ComfyUI."""
    assert COMFYUI_PATH is not None
    import_comfyui(COMFYUI_PATH)
    import comfy.model_detection

    sd = load_file(path)
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    ours = infer_config({k: v.shape for k, v in sd.items()})
    assert unet_config["image_model"] == "flux" and unet_config["guidance_embed"] == ours.guidance
    assert (unet_config["hidden_size"], unet_config["depth"], unet_config["depth_single_blocks"]) == (
        ours.hidden,
        ours.depth,
        ours.depth_single,
    )
    assert (unet_config["context_in_dim"], unet_config["vec_in_dim"]) == (ours.context_dim, ours.pooled_dim)
    unet_config.update(num_heads=ours.heads, axes_dim=list(ours.axes_dim))  # hard-coded for 3072 wide
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    assert type(model_config).__name__ == ("Flux" if ours.guidance else "FluxSchnell")
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "", device=CPU)
    model.load_model_weights(sd, "")
    return model.float()


def inputs(guidance: bool, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "x": torch.randn(2, 16, 9, 12, generator=gen),  # odd height: padded to the 2x2 patch, cropped
        "timesteps": torch.tensor([0.93, 0.41]),  # sigma, as ComfyUI's model_sampling passes it
        "context": torch.randn(2, 11, 32, generator=gen),
        "y": torch.randn(2, 16, generator=gen),
    }
    if guidance:
        tensors["guidance"] = torch.tensor([3.5, 2.0])
    tokens = 5 * 6
    a, b = torch.randn(2, tokens, 64, generator=gen), torch.randn(2, tokens - 4, 64, generator=gen)
    comfy_control = {"input": [None, a], "output": [b, None]}
    return tensors | {"control.input.1": a, "control.output.0": b}, comfy_control


def comfy_step(diffusion_model: Any, tensors: dict[str, torch.Tensor], control: dict | None) -> torch.Tensor:
    with torch.inference_mode():
        return diffusion_model(
            tensors["x"],
            tensors["timesteps"],
            tensors["context"],
            tensors["y"],
            tensors.get("guidance"),
            control=control,
            transformer_options={},
        )


def error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture
def service(models_dir, start_service):
    return start_service(build, make_settings(models_dir))


async def test_flux_steps_match_comfyui(service, models_dir, capsys) -> None:
    async with AsyncClient("unet", url=service.url) as client:
        for variant, name in VARIANTS.items():
            model = comfy_flux(models_dir / name)
            tensors, control = inputs(variant == "dev", seed=1)
            plain = {k: v for k, v in tensors.items() if not k.startswith("control")}
            for sent, comfy_control in ((plain, None), (tensors, control)):
                out, _ = await client.call("step", sent, {"model": name})
                theirs = comfy_step(model.diffusion_model, sent, comfy_control)
                assert out["out"].shape == theirs.shape == tensors["x"].shape
                err = error(out["out"], theirs)
                with capsys.disabled():
                    print(
                        f"\nflux-{variant} {'control' if comfy_control else 'plain'}: max rel error {err:.2e}"
                    )
                assert err < RTOL


async def test_flux_loras_match_comfyuis_lora_loader(service, models_dir, capsys) -> None:
    import comfy.model_patcher
    import comfy.sd

    name = VARIANTS["dev"]
    sd = load_file(models_dir / name)
    config = infer_config({k: v.shape for k, v in sd.items()})
    bfl = {m: tuple(sd[f"{m}.weight"].shape) for m in module_map(config)}
    peft = {"transformer_blocks.0.attn.to_q": (64, 64), "single_transformer_blocks.1.proj_mlp": (256, 64)}
    loras = models_dir / "loras"
    write_flux_lora(loras / "cf-kohya.safetensors", bfl, "kohya", seed=5)  # every BFL Linear, fused ones too
    write_flux_lora(loras / "cf-bfl.safetensors", bfl, "bfl", rank=2, seed=6)
    # ComfyUI reads no PEFT metadata alpha (diffusers and the service do): a file without one.
    write_flux_lora(loras / "cf-peft.safetensors", peft, "peft", alpha=None, seed=7)
    model = comfy_flux(models_dir / name)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    tensors, _ = inputs(True, seed=2)
    plain = {k: v for k, v in tensors.items() if not k.startswith("control")}
    base = comfy_step(model.diffusion_model, plain, None)
    async with AsyncClient("unet", url=service.url) as client:
        for fmt, strength in (("kohya", 0.8), ("bfl", -0.7), ("peft", 1.0)):
            lora_file = f"cf-{fmt}.safetensors"
            patched, _ = comfy.sd.load_lora_for_models(
                patcher, None, load_file(loras / lora_file), strength, 0.0
            )
            patched.patch_model()
            try:
                theirs = comfy_step(patched.model.diffusion_model, plain, None)
            finally:
                patched.unpatch_model()
            assert error(theirs, base) > 1e-3  # ComfyUI applied the LoRA
            lora = [{"name": lora_file, "strength": strength}]
            out, _ = await client.call("step", plain, {"model": name, "lora": lora})
            err = error(out["out"], theirs)
            with capsys.disabled():
                print(f"\nflux-dev LoRA {fmt}: max rel error vs ComfyUI {err:.2e}")
            assert err < RTOL
