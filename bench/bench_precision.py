"""fp8 and GGUF Q8_0 UNets against fp16: resident weight bytes, file bytes and step time (SDXL 1024²,
batch 2 = CFG), and each variant's output error against fp16 so a fast-but-wrong variant shows.

The fp16 fixture is written once and converted with the project's converter (`luna-stack convert`'s
write_copy). Each variant is loaded through a real UNet service (its precision setting, its loader, the
bytes its /v1/unet/models reports); the step is then timed on the service's resident model in process
(eager, sync + perf_counter after warm-up), so the numbers are the weights' cost, not HTTP's. bf16 is there
because fp8 computes in bf16: fp8 against bf16 is the cost of the per-layer upcast alone.

    python -m bench.bench_precision            # SDXL 1024² on the GPU
    python -m bench.bench_precision --small    # CPU smoke run (CI); fp32 is the reference there
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures import unet_config
from luna_stack.gpu.device import select_device
from luna_stack.unet.convert import TARGETS, default_output, write_copy
from luna_stack.unet.sd_unet import SdUnet
from luna_stack.weights.precision import PRECISIONS

from .common import median_ms, print_table, timed_sync
from .unet_common import (
    config_inputs,
    defaults,
    device_inputs,
    forward,
    model_file,
    models_root,
    parser,
    save,
    serve,
)

GB = 1e9
COLUMNS = [
    "variant",
    "compute",
    "file_gb",
    "weights_gb",
    "bytes_vs_base",
    "gpu_alloc_gb",
    "step_ms",
    "time_vs_base",
    "step_peak_gb",
    "rel_error",
]


def converted(root: Path, source: str, target: str) -> str:
    """The converted copy next to the source, written once per models dir (the GGUF quantization of a full
    SDXL UNet takes a while)."""
    out = default_output(root / source, target)
    if not out.exists():
        part = out.with_name(out.name + ".part")  # an interrupted run must not leave a "converted" file
        write_copy(root / source, target, part)
        part.replace(out)
    return str(out.relative_to(root))


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / GB


def time_step(model: SdUnet, inputs: dict[str, Tensor], steps: int) -> tuple[float, int | None, Tensor]:
    """Median step ms after warm-up, the step's peak device memory above what was allocated before it,
    and the output (float32, host)."""
    batch = device_inputs(model, inputs)
    step_ms = median_ms(timed_sync(lambda: forward(model, batch), steps, warmup=3))
    before = _allocated(model.device)
    if before is not None:
        torch.cuda.reset_peak_memory_stats(model.device)
    out = forward(model, batch)
    # Activations plus any per-layer dequantized (GGUF) or upcast (fp8) weights.
    peak = None if before is None else torch.cuda.max_memory_allocated(model.device) - before
    return step_ms, peak, out.float().cpu()


async def measure(
    args: argparse.Namespace, root: Path, name: str, precision: str, inputs: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], torch.Tensor]:
    """Load `name` through a UNet service at `precision`, time its step; returns the row and the output."""
    # Eager: the step is timed on model.module, so graphs captured at load would only cost time and memory.
    async with serve(args, root, precision=precision, graphs=0) as (url, service):
        before = _allocated(service.device)
        async with AsyncClient("unet", url=url) as client:
            _, info = await client.call("load", {}, {"model": name})
            model = next(iter(service.resident))
            loaded = _allocated(model.device)
            step_ms, peak, out = time_step(model, inputs, args.steps)
            del model
            await client.call("unload", {}, {"model": name})  # frees the weights before the next variant
    gc.collect()
    row = {
        "compute": info["dtype"],
        "file_gb": (root / name).stat().st_size / GB,
        "weights_gb": info["bytes"] / GB,
        "gpu_alloc_gb": _gb(None if before is None or loaded is None else loaded - before),
        "step_ms": step_ms,
        "step_peak_gb": _gb(peak),
        "gguf_types": info.get("gguf_types"),
    }
    return row, out


async def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants",
        default="bf16,fp8,Q8_0",
        help=f"besides the fp16 reference; any of {', '.join((*PRECISIONS, *TARGETS))}",
    )
    args = defaults(p.parse_args())
    started = time.perf_counter()
    base = "fp32" if args.small else "fp16"  # half precision on a CPU would time a slow path, not weights
    variants = [base, *(v for v in args.variants.split(",") if v != base)]
    rows: list[dict[str, Any]] = []
    with models_root(args) as root:
        source = model_file(args, root)
        inputs = config_inputs(unet_config(args.family, args.size), 2, args.latent, seed=0)
        reference: torch.Tensor | None = None
        for variant in variants:
            # Converted formats get their own file (fp8 computes in bf16, GGUF in the reference dtype);
            # bf16 is the fp16 file loaded at that precision.
            name = converted(root, source, variant) if variant in TARGETS else source
            precision = variant if variant in PRECISIONS else base
            row, out = await measure(args, root, name, precision, inputs)
            reference = out if reference is None else reference
            row["rel_error"] = float((out - reference).norm() / reference.norm())
            rows.append({"variant": variant, **row})
            print(f"{variant}: {row}", flush=True)
    for row in rows:
        row["bytes_vs_base"] = row["weights_gb"] / rows[0]["weights_gb"]
        row["time_vs_base"] = row["step_ms"] / rows[0]["step_ms"]
    device = str(select_device(args.device))
    print(f"UNet {args.family} {args.size}, latent {args.latent}², batch 2 (CFG), reference {base}, {device}")
    print_table(rows, COLUMNS)
    wall_s = round(time.perf_counter() - started, 1)
    print("results:", save("precision", args, rows, device, base=base, units="GB = 1e9 bytes", wall_s=wall_s))


if __name__ == "__main__":
    asyncio.run(main())
