"""Shared parts of the UNet benchmarks: model files, an in-process service on 127.0.0.1, step inputs,
timing and result output. `--small` uses the small CPU fixtures (CI checks the scripts still run)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from diffusers import UNet2DConditionModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luna_stack.core.app import create_app
from luna_stack.core.config import load_settings
from luna_stack.core.fixtures import unet_config, write_unet
from luna_stack.core.lora_fixtures import write_lora
from luna_stack.unet.service import UnetService, build

RESULTS = Path(__file__).resolve().parent / "results"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(
    args: argparse.Namespace, root: Path, **unet_env: Any
) -> AsyncIterator[tuple[str, UnetService]]:
    """A real UNet service on 127.0.0.1 in this event loop (compute runs on its executor thread)."""
    env = {
        "LUNA_MODEL_ROOTS": str(root),
        "LUNA_DEVICE": args.device,
        "LUNA_DTYPE": args.dtype,
        **{f"LUNA_UNET_{k.upper()}": str(v) for k, v in unet_env.items()},
    }
    service = build(load_settings(None, env=env))
    port = _free_port()
    runner = web.AppRunner(create_app(service, port))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        await runner.cleanup()


def step_inputs(model, rows: int, latent: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    inputs = {
        "x": torch.randn(rows, cfg.in_channels, latent, latent, generator=gen).to(model.dtype),
        "timesteps": torch.full((rows,), 500.0),
        "context": torch.randn(rows, 77, cfg.cross_attention_dim, generator=gen).to(model.dtype),
    }
    if model.adm_channels:
        inputs["y"] = torch.randn(rows, model.adm_channels, generator=gen).to(model.dtype)
    return inputs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def timed(fn: Callable[[], Awaitable[Any]], repeats: int) -> list[float]:
    await fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def write_results(name: str, args: argparse.Namespace, rows: list[dict[str, Any]], device: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'-small' if args.small else ''}.json"
    meta = {
        "benchmark": name,
        "family": args.family,
        "size": args.size,
        "latent": args.latent,
        "steps": args.steps,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
