"""Shared parts of the UNet benchmarks: model files, an in-process service on 127.0.0.1, step inputs,
timing and result output. `--small` uses the small CPU fixtures (CI checks the scripts still run)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from diffusers import UNet2DConditionModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luna_stack.config import load_settings
from luna_stack.devtools.embedded import free_port
from luna_stack.devtools.fixtures import unet_config, write_unet
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.server.app import SERVER_OPTIONS, create_app
from luna_stack.server.service import Service
from luna_stack.unet.family import build
from luna_stack.unet.sd_unet import SdUnet
from luna_stack.unet.step import unet_forward

from .common import sync, write_results


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--small", action="store_true", help="small random-weight UNet on the CPU (CI smoke run)")
    p.add_argument("--family", default="sdxl", choices=("sd15", "sdxl"))
    p.add_argument("--latent", type=int, default=None, help="latent side (default: 128 = 1024² SDXL)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per client")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="fp16, bf16, fp32 or auto")
    p.add_argument("--models", type=Path, help="existing models dir (unet/<family>-<size>-unet.safetensors)")
    return p


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.small:
        args.device, args.dtype = "cpu", "fp32"
    args.size = "small" if args.small else "full"
    args.latent = args.latent or (8 if args.small else {"sdxl": 128, "sd15": 64}[args.family])
    args.steps = args.steps or (3 if args.small else 20)
    return args


def model_file(args: argparse.Namespace, root: Path) -> str:
    """A random-weight UNet in the real LDM layout (written once per models dir)."""
    name = f"unet/{args.family}-{args.size}-unet.safetensors"
    if not (root / name).exists():
        (root / "unet").mkdir(parents=True, exist_ok=True)
        dtype = torch.float32 if args.small else torch.float16
        write_unet(root / name, args.family, args.size, dtype=dtype)
    return name


def lora_files(args: argparse.Namespace, root: Path, count: int, rank: int) -> list[str]:
    """`count` kohya LoRAs of `rank` on the attention projections, written against a meta-device UNet."""
    (root / "loras").mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(args.family, args.size))
    names = []
    for i in range(count):
        name = f"bench-{args.family}-{args.size}-r{rank}-{i}.safetensors"
        if not (root / "loras" / name).exists():
            # write_lora reads only module shapes and the config: a meta-device model suffices.
            write_lora(root / "loras" / name, unet, "unet", "kohya", rank=rank, seed=i)
        names.append(name)
    return names


@contextlib.contextmanager
def models_root(args: argparse.Namespace):
    if args.models:
        yield args.models
        return
    with tempfile.TemporaryDirectory(prefix="luna-bench-") as tmp:
        yield Path(tmp)


@contextlib.asynccontextmanager
async def serve(args: argparse.Namespace, root: Path, **unet_env: Any) -> AsyncIterator[tuple[str, Service]]:
    """A real UNet service on 127.0.0.1 in this event loop (compute runs on its executor thread)."""
    env = {
        "LUNA_MODEL_ROOTS": str(root),
        "LUNA_DEVICE": args.device,
        "LUNA_DTYPE": args.dtype,
        # Steady state: graphs captured before ready and inline when first met, never eager while
        # waiting for an idle moment a benchmark's back-to-back steps never give.
        "LUNA_UNET_GRAPH_CAPTURE": "start",
        **{f"LUNA_UNET_{k.upper()}": str(v) for k, v in unet_env.items()},
    }
    service = build(load_settings(None, env=env))
    port = free_port()
    runner = web.AppRunner(create_app(service, port), **SERVER_OPTIONS)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        await runner.cleanup()


def config_inputs(
    config: Mapping[str, Any], rows: int, latent: int, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random step inputs (host tensors) for a UNet config: what a client without the model sends."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(rows, config["in_channels"], latent, latent, generator=gen).to(dtype),
        "timesteps": torch.full((rows,), 500.0),
        "context": torch.randn(rows, 77, config["cross_attention_dim"], generator=gen).to(dtype),
    }
    if config.get("class_embed_type") == "projection":  # SDXL's label embedding (SdUnet.adm_channels)
        adm = config["projection_class_embeddings_input_dim"]
        inputs["y"] = torch.randn(rows, adm, generator=gen).to(dtype)
    return inputs


def step_inputs(model: SdUnet, rows: int, latent: int, seed: int) -> dict[str, torch.Tensor]:
    return config_inputs(model.config, rows, latent, seed, model.dtype)


def device_inputs(model: SdUnet, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Step inputs on the model's device in its compute dtype (timesteps stay fp32, as ComfyUI sends)."""
    return {
        k: v.to(model.device, torch.float32 if k == "timesteps" else model.dtype) for k, v in inputs.items()
    }


def forward(model: SdUnet, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One step in process, no service: ComfyUI's diffusion_model call on device inputs, synced."""
    with torch.inference_mode():
        out = unet_forward(model.module, inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y"))
    sync(model.device)
    return out


def save(name: str, args: argparse.Namespace, rows: list[dict[str, Any]], device: str, **extra: Any) -> Path:
    meta = {"family": args.family, "size": args.size, "latent": args.latent, "steps": args.steps, **extra}
    return write_results(name, args.small, meta, rows, device)
