"""Flux.1 through the real unet service on 127.0.0.1: steps equal the same model in process, mixed
resolutions batch per shape only, LoRA in the formats people share (kohya / BFL / diffusers-PEFT) equals
a privately merged copy, and bad requests are 4xx."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures_flux import write_flux_lora
from luna_stack.lora.resolve import adaptable_modules
from luna_stack.unet.family import build
from luna_stack.unet.flux.arch import FluxModel, build_module
from luna_stack.unet.flux.layout import infer_config, module_map
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.wire.errors import LunaError

from .conftest import make_settings
from .test_flux import step_inputs

DEV = "unet/flux-dev-small.safetensors"
SCHNELL = "unet/flux-schnell-small.safetensors"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def refs(models_dir: Path) -> dict[str, FluxModel]:
    return {name: load_diffusion_model(name, models_dir / name, "fp32", CPU) for name in (DEV, SCHNELL)}


def reference(model: FluxModel, inputs: dict[str, torch.Tensor], module: torch.nn.Module | None = None):
    step = model.parse_step(inputs, {})
    original, model.module = model.module, module or model.module
    try:
        with torch.inference_mode():
            return model.forward(step.shape, step.tensors)
    finally:
        model.module = original


@pytest.fixture
def service(models_dir, start_service, redis_url):
    settings = make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_UNET_MAX_DELAY_MS="150")
    return start_service(build, settings)


async def test_steps_equal_the_model_in_process(service, refs) -> None:
    gen = torch.Generator().manual_seed(20)
    async with AsyncClient("unet", url=service.url) as client:
        for name in (DEV, SCHNELL):
            inputs = step_inputs(refs[name], h=10, w=14, seed=21)
            out, params = await client.call("step", inputs, {"model": name})
            assert params["family"] == "flux" and out["out"].shape == inputs["x"].shape
            assert torch.equal(out["out"], reference(refs[name], inputs))
        # ControlNet residuals [B, image tokens, hidden] after double block 0 and single block 1.
        inputs = step_inputs(refs[DEV], h=10, w=14, seed=22)
        control = {"control.input.0": torch.randn(2, 35, 64, generator=gen)}
        control["control.output.1"] = torch.randn(1, 35, 64, generator=gen)
        out, _ = await client.call("step", inputs | control, {"model": DEV})
        assert torch.equal(out["out"], reference(refs[DEV], inputs | control))
        assert not torch.equal(out["out"], reference(refs[DEV], inputs))
        half = {k: v.half() if k == "x" else v for k, v in inputs.items()}
        out, _ = await client.call("step", half, {"model": DEV})
        assert out["out"].dtype == torch.float16 and out["out"].shape == inputs["x"].shape
        models = await client.get_json("/v1/unet/models")
    described = {m["name"]: m for m in models["loaded"]}
    assert described[DEV]["guidance_embed"] is True and described[SCHNELL]["variant"] == "schnell"
    assert described[DEV]["family"] == "flux" and described[DEV]["precision"] == "fp32"  # CPU: as unet's


async def test_mixed_resolutions_batch_per_shape_and_equal_their_solo_results(service, refs) -> None:
    """Merged forwards compare with tolerance: CPU GEMMs are not batch-size invariant."""
    sizes = [(8, 8, 7), (8, 12, 7), (8, 8, 9), (8, 12, 7)] * 2  # (H, W, context tokens)
    requests = [
        (step_inputs(refs[DEV], h=h, w=w, tokens=t, seed=30 + i), {"model": DEV})
        for i, (h, w, t) in enumerate(sizes)
    ]
    clients = [AsyncClient("unet", url=service.url, name=f"c{i}") for i in range(len(requests))]
    try:
        alone = [await c.call("step", *r) for c, r in zip(clients, requests, strict=True)]
        rounds = []
        for _ in range(3):  # a loaded CI machine may deliver a round too spread out to merge: retry
            rounds.append(
                await asyncio.gather(*(c.call("step", *r) for c, r in zip(clients, requests, strict=True)))
            )
            if max(params["batch_rows"] for _, params in rounds[-1]) >= 4:
                break
    finally:
        for c in clients:
            await c.close()
    together = rounds[-1]
    for (inputs, _), (solo, solo_params), (out, _) in zip(requests, alone, together, strict=True):
        assert solo_params["batch_rows"] == 2
        assert torch.equal(solo["out"], reference(refs[DEV], inputs))
        torch.testing.assert_close(out["out"], solo["out"], rtol=1e-5, atol=1e-5)
    rows = [params["batch_rows"] for _, params in together]
    same_shape = [sizes.count(s) * 2 for s in sizes]
    assert all(r <= limit for r, limit in zip(rows, same_shape, strict=True))  # never across shapes
    assert max(rows) >= 4  # equal shapes did merge


def _bfl_shapes(path: Path) -> dict[str, tuple[int, int]]:
    sd = load_file(path)
    config = infer_config({k: v.shape for k, v in sd.items()})
    return {m: tuple(sd[f"{m}.weight"].shape) for m in module_map(config)}


def merged_bfl(path: Path, loras: list[tuple[dict, float]]) -> torch.nn.Module:
    """The BFL file with each LoRA folded in, W += s · (alpha/rank) · up @ down, loaded separately."""
    sd = {k: v.float() for k, v in load_file(path).items()}
    for factors, strength in loras:
        for module, f in factors.items():
            sd[f"{module}.weight"] += strength * f.scale * (f.up @ f.down)
    return build_module(sd, "fp32", torch.float32, CPU)[1]


def merged_diffusers(module: torch.nn.Module, factors: dict, strength: float) -> torch.nn.Module:
    out = copy.deepcopy(module)
    modules = dict(out.named_modules())
    for name, f in factors.items():
        modules[name].weight.data += strength * f.scale * (f.up @ f.down)
    return out


@pytest.fixture(scope="module")
def loras(models_dir: Path, refs) -> dict[str, dict]:
    folder = models_dir / "loras"
    shapes = _bfl_shapes(models_dir / DEV)
    blocks = {m: s for m, s in shapes.items() if "blocks." in m or m.startswith("final_layer")}
    diffusers = {
        n: (m.out_features, m.in_features)
        for n, m in adaptable_modules(refs[DEV].module).items()
        if "transformer_blocks.0." in n
    }
    return {
        "flux-kohya.safetensors": write_flux_lora(folder / "flux-kohya.safetensors", blocks, "kohya", seed=1),
        "flux-bfl.safetensors": write_flux_lora(
            folder / "flux-bfl.safetensors", shapes, "bfl", rank=2, seed=2
        ),
        "flux-peft.safetensors": write_flux_lora(folder / "flux-peft.safetensors", diffusers, "peft", seed=3),
    }


async def test_lora_equals_a_privately_merged_copy_and_leaves_the_shared_weights(
    service, refs, loras, models_dir
) -> None:
    inputs = step_inputs(refs[DEV], h=8, w=10, seed=40)
    base = reference(refs[DEV], inputs)
    async with AsyncClient("unet", url=service.url) as client:
        before, _ = await client.call("step", inputs, {"model": DEV})
        for name, strength in (("flux-kohya.safetensors", 0.8), ("flux-bfl.safetensors", -0.6)):
            lora = [{"name": name, "strength": strength}]
            out, _ = await client.call("step", inputs, {"model": DEV, "lora": lora})
            expected = reference(refs[DEV], inputs, merged_bfl(models_dir / DEV, [(loras[name], strength)]))
            assert (expected - base).abs().max() > 1e-2  # the LoRA visibly changes the output
            torch.testing.assert_close(out["out"], expected, rtol=1e-4, atol=1e-4)
        lora = [{"name": "flux-peft.safetensors", "strength": 1.0}]
        out, _ = await client.call("step", inputs, {"model": DEV, "lora": lora})
        expected = reference(
            refs[DEV], inputs, merged_diffusers(refs[DEV].module, loras["flux-peft.safetensors"], 1.0)
        )
        assert (expected - base).abs().max() > 1e-2
        torch.testing.assert_close(out["out"], expected, rtol=1e-4, atol=1e-4)

        # Two requests with different LoRAs in one forward: each gets its own.
        kohya = [{"name": "flux-kohya.safetensors", "strength": 0.8}]
        async with AsyncClient("unet", url=service.url, name="other") as other:
            await other.call("step", inputs, {"model": DEV, "lora": lora})  # connected, LoRA cached
            for _ in range(3):  # retried if a loaded machine delivered the two too far apart to merge
                (a, pa), (b, pb) = await asyncio.gather(
                    client.call("step", inputs, {"model": DEV, "lora": kohya}),
                    other.call("step", inputs, {"model": DEV, "lora": lora}),
                )
                if pa["batch_rows"] == 4:
                    break
        assert pa["batch_rows"] == pb["batch_rows"] == 4
        expected_a = reference(
            refs[DEV], inputs, merged_bfl(models_dir / DEV, [(loras["flux-kohya.safetensors"], 0.8)])
        )
        torch.testing.assert_close(a["out"], expected_a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b["out"], expected, rtol=1e-4, atol=1e-4)
        after, _ = await client.call("step", inputs, {"model": DEV})
    assert torch.equal(after["out"], before["out"]) and torch.equal(before["out"], base)


async def test_bad_flux_steps_are_4xx(service, refs) -> None:
    dev = step_inputs(refs[DEV], seed=50)
    schnell = step_inputs(refs[SCHNELL], seed=51)
    no_y = {k: v for k, v in dev.items() if k != "y"}
    no_guidance = {k: v for k, v in dev.items() if k != "guidance"}
    bad = {
        "wrong latent channels": (dev | {"x": torch.zeros(2, 4, 8, 10)}, DEV),
        "wrong context width": (dev | {"context": torch.zeros(2, 7, 4096)}, DEV),
        "missing y": (no_y, DEV),
        "SD-style y": (dev | {"y": torch.zeros(2, 2816)}, DEV),
        "guidance to schnell": (schnell | {"guidance": torch.full((2,), 3.5)}, SCHNELL),
        "no guidance on dev": (no_guidance, DEV),
        "odd timesteps": (dev | {"timesteps": torch.zeros(2, 2)}, DEV),
        "an SDXL request": (dev | {"x": torch.zeros(2, 4, 8, 8), "context": torch.zeros(2, 77, 2048)}, DEV),
        "bad LoRA for Flux": (dev, DEV, [{"name": "nothing-here.safetensors", "strength": 1.0}]),
    }
    async with AsyncClient("unet", url=service.url) as client:
        for what, (tensors, model, *lora) in bad.items():
            params = {"model": model} | ({"lora": lora[0]} if lora else {})
            with pytest.raises(LunaError) as info:
                await client.call("step", tensors, params)
            assert 400 <= info.value.status < 500, f"{what}: {info.value.status} {info.value}"
        out, _ = await client.call("step", dev, {"model": DEV})
        assert torch.equal(out["out"], reference(refs[DEV], dev))


async def test_flux_precision_is_its_own_setting(models_dir, start_service) -> None:
    """unet.flux_precision=bf16 serves Flux in bf16 beside SD models in the core dtype (auto: bf16 on CUDA
    only; tests/test_flux_gpu.py checks that default)."""
    settings = make_settings(models_dir, LUNA_UNET_FLUX_PRECISION="bf16")
    service = start_service(build, settings)
    bf16 = load_diffusion_model(DEV, models_dir / DEV, "bf16", CPU)
    inputs = step_inputs(bf16, seed=60)
    async with AsyncClient("unet", url=service.url) as client:
        out, _ = await client.call("step", inputs, {"model": DEV})
        await client.call("step", sd15_inputs(), {"model": "checkpoints/sd15-small.safetensors"})
        models = await client.get_json("/v1/unet/models")
    precisions = {m["name"]: m["precision"] for m in models["loaded"]}
    assert precisions == {DEV: "bf16", "checkpoints/sd15-small.safetensors": "fp32"}
    assert out["out"].dtype == torch.float32  # x's dtype
    assert torch.equal(out["out"], reference(bf16, inputs).float())


def sd15_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(61)
    return {
        "x": torch.randn(1, 4, 8, 8, generator=gen),
        "timesteps": torch.tensor([500.0]),
        "context": torch.randn(1, 77, 32, generator=gen),
    }
