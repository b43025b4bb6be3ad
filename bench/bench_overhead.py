"""Per-operation overhead of the services against the same model in-process: SDXL VAE decode 1024², SDXL
UNet step 1024² batch 2 (CFG), CLIP L+G encode of one prompt — over HTTP and over CUDA IPC.

The services run as their own processes (CUDA IPC needs two); the bench process loads the same files
with the services' own loaders for the in-process side. Four paths per operation, interleaved call by
call so drift hits all alike, each timed from the caller until its outputs are usable:

- in_process_gpu: inputs already on the GPU, outputs left there (a UNet step in ComfyUI);
- in_process_cpu: inputs from and outputs to the host (ComfyUI's VAE decode and CLIP encode);
- http: host tensors through the keep-alive HTTP client, against in_process_cpu;
- ipc: GPU tensors through CUDA IPC buffers, against in_process_gpu.

The UNet step also runs as the graph replay the service itself runs (`graph`, the GPU floor): `ipc_cost_ms`
and `http_cost_ms` are what a request costs beyond that GPU work (issue 15: ≤ 1.5 ms over IPC, ≤ 3 ms
over HTTP). Its conditioning (context, y) is held after the first call, as the ComfyUI pack holds it.

    python -m bench.bench_overhead            # full size on the GPU
    python -m bench.bench_overhead --small    # CPU smoke run (no IPC on a CPU)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luna_stack.client.http import AsyncClient
from luna_stack.clip.bpe import shared_bpe
from luna_stack.clip.conditioning import EncodeJob, encode_jobs
from luna_stack.clip.models import load_clip_model
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, tokenize
from luna_stack.devtools.fixtures import write_clip, write_unet, write_vae
from luna_stack.gpu.device import select_device
from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.server.executor import GpuExecutor
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.step import unet_forward
from luna_stack.unet.step_runner import build_runner
from luna_stack.vae.model import load_vae
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.tensors import DTYPES

from .common import median_ms, print_table, service_process, sync, write_results

PROMPT = "a (cinematic:1.2) photo of a red fox in a snowy forest, golden hour, ((highly detailed)), 85mm"
CLIP = "clip_l.safetensors+clip_g.safetensors"
VAE = "vae/sdxl-vae.safetensors"
UNET = "unet/sdxl-unet.safetensors"
# What ComfyUI computes each in on a current GPU: the VAE in bf16, the UNet and text encoders in fp16.
DTYPE = {"vae": "bf16", "unet": "fp16", "clip": "fp16"}


@dataclass
class Operation:
    kind: str
    op: str
    label: str
    params: dict[str, Any]
    inputs: dict[str, torch.Tensor]  # host tensors
    local: Callable[[dict[str, torch.Tensor]], Any]  # the in-process computation on device inputs
    ipc_device: bool  # whether the ipc path sends GPU inputs (CLIP sends text: only outputs are GPU)
    graph: Callable[[dict[str, torch.Tensor]], Any] | None = None  # the service's graph replay, in-process
    keep: tuple[str, ...] = ()  # sticky inputs, sent once and then referred to (what the pack holds)


def write_models(root: Path, size: str) -> None:
    dtype = torch.float32 if size == "small" else torch.float16
    write_vae(root / VAE, "sdxl", size, dtype=dtype)
    write_unet(root / UNET, "sdxl", size, dtype=dtype)
    write_clip(root / "clip" / "clip_l.safetensors", "l", size, dtype=dtype)
    write_clip(root / "clip" / "clip_g.safetensors", "g", size, dtype=dtype)


def operations(args: argparse.Namespace, root: Path, device: torch.device) -> list[Operation]:
    dtype = {kind: DTYPES[args.dtype or name] for kind, name in DTYPE.items()}
    gen = torch.Generator().manual_seed(0)
    side = 64 if args.small else 1024
    vae = load_vae(VAE, root / VAE, device, dtype["vae"])
    unet = load_diffusion_model(UNET, root / UNET, args.dtype or DTYPE["unet"], device)
    clip = load_clip_model(CLIP, ModelRoots([str(root)]), device=device, dtype=dtype["clip"])
    bpe = shared_bpe()
    rows, latent = 2, side // 8
    step = {
        "x": torch.randn(rows, unet.in_channels, latent, latent, generator=gen).to(unet.dtype),
        "timesteps": torch.full((rows,), 500.0),
        "context": torch.randn(rows, 77, unet.context_dim, generator=gen).to(unet.dtype),
        "y": torch.randn(rows, unet.adm_channels, generator=gen).to(unet.dtype),
    }

    config = GraphConfig(True, (rows,), "first_use", max_shapes=1, lora_slots=0, lora_rank=0, min_gain=None)
    runner = build_runner(unet, config)
    parsed = unet.parse_step({k: v.to(device) for k, v in step.items()}, {})

    def replay(_: dict[str, torch.Tensor]) -> torch.Tensor:
        return runner.run(parsed.shape, {k: [v] for k, v in parsed.tensors.items()}, [(rows, ())])

    def clip_encode(_: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # The service tokenizes too: the in-process side pays for it as well.
        job = EncodeJob({s.key: tokenize(PROMPT, s, bpe, None, [], 64) for s in (CLIP_L, CLIP_G)})
        return encode_jobs(clip.encoders, "sdxl", [job])[0]

    return [
        Operation(
            "vae",
            "decode",
            f"VAE decode {side}²",
            {"model": VAE},
            {"latent": torch.randn(1, 4, latent, latent, generator=gen)},
            lambda t: vae.decode(t["latent"]),
            True,
        ),
        Operation(
            "unet",
            "step",
            f"UNet step {side}² b{rows}",
            {"model": UNET},
            step,
            lambda t: unet_forward(unet.module, t["x"], t["timesteps"], t["context"], t["y"]),
            True,
            replay if device.type == "cuda" else None,
            ("context", "y"),
        ),
        Operation(
            "clip", "encode", "CLIP L+G encode", {"model": CLIP, "text": PROMPT}, {}, clip_encode, False
        ),
    ]


def _outputs(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


async def measure_operation(
    operation: Operation, url: str, device: torch.device, compute: GpuExecutor, args: argparse.Namespace
) -> dict[str, Any]:
    on_gpu = device.type == "cuda"
    on_device = {k: v.to(device) for k, v in operation.inputs.items()}
    async with (
        AsyncClient(operation.kind, url=url, ipc="off", name="bench-http") as http,
        AsyncClient(operation.kind, url=url, name="bench-ipc") as ipc,
    ):

        def local_gpu() -> None:
            with torch.inference_mode():
                operation.local(on_device)
            sync(device)

        def local_cpu() -> None:
            with torch.inference_mode():
                moved = {k: v.to(device) for k, v in operation.inputs.items()}
                for t in _outputs(operation.local(moved)):
                    t.cpu()

        async def over_http() -> None:
            await http.call(operation.op, operation.inputs, operation.params, keep=operation.keep)

        async def over_ipc() -> None:
            sent = on_device if operation.ipc_device else operation.inputs
            await ipc.call(operation.op, sent, operation.params, device=device, keep=operation.keep)
            sync(device)

        def graph() -> None:
            assert operation.graph is not None
            with torch.inference_mode():
                operation.graph(on_device)
            sync(device)

        paths: dict[str, Callable[[], Awaitable[Any]]] = {
            "in_process_gpu": lambda: compute.run(local_gpu),
            "in_process_cpu": lambda: compute.run(local_cpu),
            "http": over_http,
        }
        if on_gpu:
            paths["ipc"] = over_ipc
        if operation.graph is not None:
            paths["graph"] = lambda: compute.run(graph)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for run in paths.values():  # warm-up: allocator, cuDNN plans, IPC buffers
            for _ in range(3):
                await run()
        for _ in range(args.repeats):  # interleaved, so drift and clock changes hit every path alike
            for name, run in paths.items():
                started = time.perf_counter()
                await run()
                times[name].append(time.perf_counter() - started)
        row: dict[str, Any] = {"operation": operation.label}
        row.update({f"{name}_ms": median_ms(t) for name, t in times.items()})
        row["http/in_process"] = row["http_ms"] / row["in_process_cpu_ms"]
        row["ipc/in_process"] = row["ipc_ms"] / row["in_process_gpu_ms"] if on_gpu else None
        if "graph_ms" in row:
            row["ipc_cost_ms"] = row["ipc_ms"] - row["graph_ms"]
            row["http_cost_ms"] = row["http_ms"] - row["graph_ms"]
        row["ipc_calls"] = ipc.ipc.calls
    print(f"{operation.label}: {row}", flush=True)
    return row


async def measure(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    device = select_device(args.device)
    write_models(root, "small" if args.small else "full")
    compute = GpuExecutor("in-process")  # ComfyUI runs models on its worker thread, not an event loop
    rows = []
    for operation in operations(args, root, device):
        env = {
            "LUNA_MODEL_ROOTS": str(root),
            "LUNA_DEVICE": str(device),
            "LUNA_DTYPE": args.dtype or DTYPE[operation.kind],
            f"LUNA_{operation.kind.upper()}_PRELOAD": operation.params["model"],
            # One caller at a time: no batching window (the http and ipc clients alternate).
            f"LUNA_{operation.kind.upper()}_MAX_DELAY_MS": "0",
        }
        if operation.kind == "clip":
            env["LUNA_CLIP_CACHE"] = "false"  # measure the encode, not the conditioning cache
        if operation.kind in ("clip", "unet"):  # steady state: graphs captured before ready
            env[f"LUNA_{operation.kind.upper()}_GRAPH_CAPTURE"] = "start"
        with service_process(operation.kind, env) as url:
            rows.append(await measure_operation(operation, url, device, compute, args))
    compute.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--small", action="store_true", help="small random-weight models on the CPU (CI smoke run)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="one dtype for all (default: VAE bf16, UNet/CLIP fp16)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if args.small:
        args.device, args.dtype = "cpu", "fp32"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="luna-bench-") as tmp:
        rows = asyncio.run(measure(args, Path(tmp)))
    columns = ["operation", "in_process_gpu_ms", "in_process_cpu_ms", "http_ms"]
    columns += ["ipc_ms"] if "ipc_ms" in rows[0] else []
    costs = ["graph_ms", "ipc_cost_ms", "http_cost_ms"] if any("graph_ms" in r for r in rows) else []
    print_table(rows, [*columns, "http/in_process", "ipc/in_process", *costs])
    meta = {
        "dtypes": {k: args.dtype or v for k, v in DTYPE.items()},
        "repeats": args.repeats,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    path = write_results("overhead", args.small, meta, rows, str(select_device(args.device)))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
