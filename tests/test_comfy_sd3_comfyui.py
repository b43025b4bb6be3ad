"""SD3 / SD3.5 parity with real ComfyUI: the same SAI-layout file through ComfyUI's own loader
(comfy.sd.load_diffusion_model -> OpenAISignatureMMDITWrapper) and through the unet service's step.

ComfyUI's call is `diffusion_model(x, timesteps, context, y, control)` with timesteps from its
ModelSamplingDiscreteFlow (sigma × 1000); the service must give the same output for the same tensors:
whole-patch and odd latents (padded, cropped), ControlNet residuals on every block, in fp32.

Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements; see docs/comfyui.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures_sd3 import VARIANTS, sd3_config, sd3_file_name, write_sd3
from luna_stack.unet.family import build

from .comfyui_harness import COMFYUI_PATH, ROOT, requires_comfyui
from .comfyui_import import import_comfyui
from .conftest import make_settings

pytestmark = requires_comfyui
TOL = 1e-5  # max |Δ| / max |ComfyUI|: fp32 kernels in a different order (attention concat, gate sums)


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd3_models")
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


def _pack(name: str) -> Any:
    """A module of the pack under the name ComfyUI's custom-node loader gives it (the path, dots replaced),
    loaded that way unless another test's ComfyUI already did, so the pack's hooks are installed once."""
    package = str(ROOT / "comfy_nodes").replace(".", "_x_")
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, ROOT / "comfy_nodes" / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


def test_shared_model_samples_like_comfyuis_own(
    sd3_models: Path, comfy_sd: Any, start_service, redis_url
) -> None:
    """KSampler over the pack's MODEL proxy (ComfyUI's own SD3 BaseModel: flow shift 3, sgm_uniform
    sigmas, CFG) equals KSampler over ComfyUI's locally loaded copy of the same file."""
    import comfy.sample

    variant = "sd3.5-large"
    name = f"unet/{sd3_file_name(variant)}"
    service = start_service(build, make_settings(sd3_models, LUNA_REDIS_URL=redis_url))
    proxy, settings = _pack("model_proxy"), _pack("settings")
    services = proxy.Services(
        settings.PackSettings({"clip": None, "vae": None, "unet": service.url}, None, None)
    )
    shared = proxy.remote_model(services, name, services.unet_load(name))
    local = comfy_sd.load_diffusion_model(str(sd3_models / name))
    cfg = sd3_config(variant)
    gen = torch.Generator().manual_seed(5)

    def cond() -> list:
        context = torch.randn(1, 19, cfg.joint_attention_dim, generator=gen)
        return [[context, {"pooled_output": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}]]

    positive, negative = cond(), cond()
    latent = torch.zeros(1, 16, 14, 18)
    noise = torch.randn(latent.shape, generator=gen)
    runs = {}
    for which, model in (("shared", shared), ("local", local)):
        runs[which] = comfy.sample.sample(
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
    error = float((runs["shared"] - runs["local"]).abs().max() / runs["local"].abs().max())
    print(f"\nKSampler over the shared SD3.5 model vs ComfyUI's own: max relative error {error:.2e}")
    assert (runs["local"] - noise).abs().max() > 0.1 and error < 1e-4
