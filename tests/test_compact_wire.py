"""The pack's UNet steps on the wire: x, context, y and control in the model's compute dtype (the service
casts them to it anyway and computes `out` in it), timesteps and guidance in float32, conditioning sent
once — the outputs bitwise those of float32 full sends, through real services on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from comfy_nodes import remote
from comfy_nodes.remote import Services, wire_dtype
from comfy_nodes.settings import PackSettings
from luna_stack.devtools.embedded import free_port
from luna_stack.devtools.fixtures import unet_config
from luna_stack.unet.family import build
from luna_stack.unet.step import input_block_shapes

from .conftest import make_settings

SD15 = "checkpoints/sd15-small.safetensors"
SDXL = "unet/sdxl-small-unet.safetensors"
FLUX = "unet/flux-dev-small.safetensors"


def pack_for(url: str) -> Services:
    dead = f"http://127.0.0.1:{free_port()}"
    return Services(PackSettings({"clip": dead, "vae": dead, "unet": url}, None, None))


def steps(model: str, seed: int) -> list[dict]:
    """unet_step's arguments for two steps of one sampling run (same conditioning, new x and t)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2
    if model == FLUX:
        cond = {
            "context": torch.randn(rows, 16, 32, generator=gen),
            "y": torch.randn(rows, 16, generator=gen),
        }
        cond["guidance"] = torch.full((rows,), 3.3)  # not a float16 / bfloat16 number: must stay float32
        channels = 16
    else:
        width = 96 if model == SDXL else 32
        cond = {"context": torch.randn(rows, 77, width, generator=gen)}
        if model == SDXL:
            cond["y"] = torch.randn(rows, 1600, generator=gen)
            shapes = input_block_shapes(UNet2DConditionModel(**unet_config("sdxl", "small")), 8, 8)
            cond["control"] = {
                "output": [torch.randn(rows, *s, generator=gen) for s in shapes],
                "middle": [torch.randn(rows, *shapes[-1], generator=gen)],
            }
        channels = 4
    return [
        {
            "x": torch.randn(rows, channels, 8, 8, generator=gen),
            "timesteps": torch.rand(rows, generator=gen) * (1.0 if model == FLUX else 999.0),
            **cond,
        }
        for _ in range(2)
    ]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compact_wire_is_bitwise_equal_to_float32(models_dir: Path, start_service, dtype: str) -> None:
    unet = start_service(build, make_settings(models_dir, LUNA_DTYPE=dtype))
    svc = pack_for(unet.url)
    wire = svc.client("unet").aio
    try:
        for model in (SD15, SDXL, FLUX):
            compact = wire_dtype(svc.unet_load(model))
            assert compact == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
            for seed, kwargs in enumerate(steps(model, seed=3)):
                before = wire.bytes_sent
                full = svc.unet_step(model, **kwargs)
                full_bytes = wire.bytes_sent - before
                out = svc.unet_step(model, **kwargs, dtype=compact)
                small_bytes = wire.bytes_sent - before - full_bytes
                assert out.dtype == torch.float32 and torch.equal(out, full), (model, seed)
                # Both first steps carry the conditioning, later ones x and timesteps only.
                assert small_bytes < full_bytes * (0.6 if seed == 0 else 1), (model, seed)
    finally:
        svc.close()


def test_float32_models_travel_in_float32(models_dir: Path, start_service) -> None:
    unet = start_service(build, make_settings(models_dir))
    svc = pack_for(unet.url)
    try:
        assert wire_dtype(svc.unet_load(SD15)) == torch.float32
        kwargs = steps(SD15, seed=4)[0]
        direct, _ = svc.client("unet").call(
            "step", {k: kwargs[k] for k in ("x", "timesteps", "context")}, {"model": SD15}
        )
        assert torch.equal(svc.unet_step(SD15, **kwargs, dtype=torch.float32), direct["out"])
    finally:
        svc.close()


def test_a_sampling_run_sends_its_conditioning_once(
    models_dir: Path, start_service, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = start_service(build, make_settings(models_dir, LUNA_DTYPE="fp16"))
    svc = pack_for(unet.url)
    monkeypatch.setattr(remote, "_shared", svc)
    wire = svc.client("unet").aio
    try:
        compact = wire_dtype(svc.unet_load(SDXL))
        first, second = steps(SDXL, seed=5)
        second.pop("control")  # conditioning only: x, timesteps and control are never held
        first.pop("control")
        sizes = []
        for kwargs in (first, second, {**second, "x": second["x"] * 0.5}):
            before = wire.bytes_sent
            svc.unet_step(SDXL, **kwargs, dtype=compact)
            sizes.append(wire.bytes_sent - before)
        cond = 2 * (first["context"].numel() + first["y"].numel())  # float16 bytes
        assert sizes[1] < sizes[0] - cond and sizes[2] < sizes[0] - cond
        assert wire.held.counts.referred == 4 and wire.held.counts.sent == 2
        assert svc.client("unet").status()["held"]["hits"] == 4
    finally:
        svc.close()
