"""SD3 / SD3.5 parity with real ComfyUI: the same SAI-layout file through ComfyUI's own loader
(comfy.sd.load_diffusion_model -> OpenAISignatureMMDITWrapper) and through the unet service's step.

ComfyUI's call is `diffusion_model(x, timesteps, context, y, control)` with timesteps from its
ModelSamplingDiscreteFlow (sigma × 1000); the service must give the same output for the same tensors:
whole-patch and odd latents (padded, cropped), ControlNet residuals on every block, in fp32. Also: LoRA
files in four namings through ComfyUI's LoRA loader vs the service, and KSampler over the pack's Shared
UNet Loader (the session harness's pack and services) vs KSampler over ComfyUI's own model.

Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements; see docs/comfyui.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures_sd3 import VARIANTS, sd3_config, sd3_file_name, write_sd3
from luna_stack.unet.arch import Loaded
from luna_stack.unet.family import build
from luna_stack.unet.sd3.arch import Sd3Arch

from .comfyui_harness import COMFYUI_PATH, ComfyRuntime, pack_module, requires_comfyui, unload
from .comfyui_import import import_comfyui
from .conftest import make_settings

pytestmark = requires_comfyui
TOL = 1e-5  # max |Δ| / max |ComfyUI|: fp32 kernels in a different order (attention concat, gate sums)


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd3_models")
    (root / "loras").mkdir()
    for variant in VARIANTS:
        write_sd3(root / "unet" / sd3_file_name(variant), variant, seed=3, dtype=torch.float32)
    return root


@pytest.fixture(scope="module")
def comfy_sd() -> Any:
    assert COMFYUI_PATH is not None
    import_comfyui(COMFYUI_PATH)
    import comfy.sd

    return comfy.sd


def _inputs(
    variant: str, sigmas: torch.Tensor, height: int, width: int, seed: int
) -> dict[str, torch.Tensor]:
    cfg = sd3_config(variant)
    gen = torch.Generator().manual_seed(seed)
    rows = sigmas.shape[0]
    return {
        "x": torch.randn(rows, cfg.in_channels, height, width, generator=gen),
        "context": torch.randn(rows, 17, cfg.joint_attention_dim, generator=gen),
        "y": torch.randn(rows, cfg.pooled_projection_dim, generator=gen),
    }


@pytest.mark.parametrize("variant", VARIANTS)
async def test_service_step_equals_comfyuis_mmdit(
    variant: str, sd3_models: Path, comfy_sd: Any, start_service, redis_url: str
) -> None:
    path = sd3_models / "unet" / sd3_file_name(variant)
    patcher = comfy_sd.load_diffusion_model(str(path))
    model = patcher.model
    assert (
        type(model).__name__ == "SD3"
        and type(model.diffusion_model).__name__ == "OpenAISignatureMMDITWrapper"
    )
    mmdit = model.diffusion_model.float()
    sigmas = torch.tensor([1.0, 0.4123])
    timesteps = model.model_sampling.timestep(sigmas)  # ComfyUI's flow timesteps: sigma × 1000
    torch.testing.assert_close(timesteps, sigmas * 1000)
    service = start_service(build, make_settings(sd3_models, LUNA_REDIS_URL=redis_url))
    cfg = sd3_config(variant)
    worst = 0.0
    async with AsyncClient("unet", url=service.url) as client:
        for (height, width), control_blocks in (((16, 16), ()), ((15, 21), ()), ((12, 10), (0, 1))):
            inputs = _inputs(variant, sigmas, height, width, seed=height * width)
            tokens = -(-height // 2) * -(-width // 2)
            gen = torch.Generator().manual_seed(7)
            residuals = [torch.randn(2, tokens, cfg.hidden, generator=gen) for _ in control_blocks]
            with torch.inference_mode():
                control = {"output": [r.clone() for r in residuals]} if residuals else None
                expected = mmdit(inputs["x"], timesteps, inputs["context"], inputs["y"], control=control)
            wire = inputs | {"timesteps": timesteps}
            wire |= {f"control.output.{i}": r for i, r in zip(control_blocks, residuals, strict=True)}
            out, _ = await client.call("step", wire, {"model": f"unet/{sd3_file_name(variant)}"})
            got = out["out"]
            assert got.shape == expected.shape == (2, 16, height, width)
            error = float((got - expected).abs().max() / expected.abs().max())
            worst = max(worst, error)
            assert error < TOL, f"{variant} {height}x{width} control {control_blocks}: {error:.2e}"
    print(f"\n{variant}: max relative error vs ComfyUI {worst:.2e}")


def test_shared_unet_loader_samples_like_comfyuis_own(comfy: ComfyRuntime, comfy_sd: Any) -> None:
    """KSampler over the pack's Shared UNet Loader MODEL (ComfyUI's own SD3 BaseModel: flow shift 3,
    sgm_uniform sigmas, CFG) equals KSampler over ComfyUI's locally loaded copy of the same file."""
    sample = importlib.import_module("comfy.sample")  # (`comfy` is the harness here)
    variant = "sd3.5-large"
    file = f"proxy-{sd3_file_name(variant)}"
    path = write_sd3(comfy.models / "unet" / file, variant, seed=4, dtype=torch.float32)  # the shared folder
    shared = pack_module("nodes").SharedUNetLoader().load(file)[0]
    local = comfy_sd.load_diffusion_model(str(path))
    cfg = sd3_config(variant)
    gen = torch.Generator().manual_seed(5)

    def cond() -> list:
        context = torch.randn(1, 19, cfg.joint_attention_dim, generator=gen)
        return [[context, {"pooled_output": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}]]

    positive, negative = cond(), cond()
    latent = torch.zeros(1, 16, 14, 18)
    noise = torch.randn(latent.shape, generator=gen)
    try:
        runs = {
            which: sample.sample(
                model,
                noise,
                3,
                4.5,
                "euler",
                "sgm_uniform",
                positive,
                negative,
                latent,
                seed=5,
                disable_pbar=True,
            )
            for which, model in (("shared", shared), ("local", local))
        }
    finally:
        unload(shared.model.diffusion_model.model_name, ("UNET",))
        path.unlink()
    error = float((runs["shared"] - runs["local"]).abs().max() / runs["local"].abs().max())
    print(f"\nKSampler over the shared SD3.5 model vs ComfyUI's own: max relative error {error:.2e}")
    assert (runs["local"] - noise).abs().max() > 0.1 and error < 1e-4


def _lora_file(path: Path, modules: dict[str, tuple[int, int]], fmt: str, seed: int) -> None:
    """Random rank-4 factors for `modules` (name -> weight shape): kohya (`lora_unet_` + SAI path with _,
    alpha 2), `diffusion_model.` + SAI path (alpha 2), PEFT `transformer.` + diffusers path (no alpha:
    ComfyUI reads no PEFT metadata) or OneTrainer's `lora_transformer_` + diffusers path with _."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (rows, cols) in modules.items():
        down = torch.randn(4, cols, generator=gen) / cols**0.5
        up = torch.randn(rows, 4, generator=gen) * 0.3
        if fmt == "peft":
            tensors |= {
                f"transformer.{module}.lora_A.weight": down,
                f"transformer.{module}.lora_B.weight": up,
            }
            continue
        base = {
            "kohya": "lora_unet_" + module.replace(".", "_"),
            "generic": f"diffusion_model.{module}",
            "onetrainer": "lora_transformer_" + module.replace(".", "_"),
        }[fmt]
        tensors |= {
            f"{base}.lora_down.weight": down,
            f"{base}.lora_up.weight": up,
            f"{base}.alpha": torch.tensor(2.0),
        }
    save_file(tensors, str(path))


async def test_loras_match_comfyuis_lora_loader(
    sd3_models: Path, comfy_sd: Any, start_service, redis_url
) -> None:
    """The same LoRA files through ComfyUI's load_lora_for_models on its own model and through the
    service: SAI names with fused qkv (kohya and `diffusion_model.`), diffusers names (PEFT, OneTrainer)."""
    variant = "sd3.5-medium"
    name = f"unet/{sd3_file_name(variant)}"
    sai = load_file(sd3_models / name)
    linear_sai = {
        k.removesuffix(".weight"): tuple(v.shape)
        for k, v in sai.items()
        if k.endswith(".weight") and v.ndim == 2
    }
    model = Sd3Arch().build(
        dict(sai), Loaded(name, sd3_models / name, "fp32", torch.float32, torch.device("cpu"))
    )
    diffusers = {
        n: tuple(m.weight.shape) for n, m in model.module.named_modules() if isinstance(m, torch.nn.Linear)
    }
    diffusers = {n: s for n, s in diffusers.items() if ".attn" in n or ".ff" in n}
    files = {"kohya": linear_sai, "generic": linear_sai, "peft": diffusers, "onetrainer": diffusers}
    for i, (fmt, modules) in enumerate(files.items()):
        _lora_file(sd3_models / "loras" / f"cf-{fmt}.safetensors", modules, fmt, seed=20 + i)
    service = start_service(build, make_settings(sd3_models, LUNA_REDIS_URL=redis_url))
    patcher = comfy_sd.load_diffusion_model(str(sd3_models / name))
    sigmas = torch.tensor([1.0, 0.6])
    timesteps = patcher.model.model_sampling.timestep(sigmas)
    tensors = _inputs(variant, sigmas, 14, 18, seed=9) | {"timesteps": timesteps}

    def comfy_step(model: Any) -> torch.Tensor:
        with torch.inference_mode():
            return model.diffusion_model.float()(tensors["x"], timesteps, tensors["context"], tensors["y"])

    base = comfy_step(patcher.model)
    async with AsyncClient("unet", url=service.url) as client:
        for fmt, strength in (("kohya", 0.8), ("generic", -0.6), ("peft", 1.0), ("onetrainer", 0.7)):
            lora_file = f"cf-{fmt}.safetensors"
            patched, _ = comfy_sd.load_lora_for_models(
                patcher, None, load_file(sd3_models / "loras" / lora_file), strength, 0.0
            )
            patched.patch_model()
            try:
                theirs = comfy_step(patched.model)
            finally:
                patched.unpatch_model()
            assert float((theirs - base).abs().max()) > 1e-2  # ComfyUI applied the LoRA
            out, _ = await client.call(
                "step", tensors, {"model": name, "lora": [{"name": lora_file, "strength": strength}]}
            )
            error = float((out["out"] - theirs).abs().max() / theirs.abs().max())
            print(f"\n{variant} LoRA {fmt}: max relative error vs ComfyUI {error:.2e}")
            assert error < 1e-5, fmt
