"""VAE decode through the service (HTTP, keep-alive) against the same model decoding in-process.

Both paths use one loaded VaeModel, alternate in one run, and are timed from the caller's side: the
in-process time includes moving the latent to the device and the image back to the CPU, as ComfyUI's
own VAE decode does. Prints ms and the ratio per size; writes bench/results/vae_overhead[-small].json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luna_stack.core.client import AsyncClient
from luna_stack.core.config import load_settings
from luna_stack.core.embedded import EmbeddedService
from luna_stack.core.executor import GpuExecutor
from luna_stack.core.fixtures import write_vae
from luna_stack.core.gpu import select_device
from luna_stack.vae.service import build

from .common import median_ms, print_table, sync, timed, write_results


async def measure(args: argparse.Namespace, root: Path) -> list[dict]:
    size = "small" if args.small else "full"
    write_vae(
        root / "vae" / "bench-vae.safetensors",
        size=size,
        dtype=torch.float16 if not args.small else torch.float32,
    )
    env = {
        "LUNA_MODEL_ROOTS": str(root),
        "LUNA_DEVICE": args.device,
        "LUNA_DTYPE": args.dtype,
        "LUNA_VAE_PRELOAD": "bench-vae",
        "LUNA_VAE_MAX_DELAY_MS": "0",
    }
    rows = []
    local_thread = GpuExecutor("in-process")
    with EmbeddedService(build(load_settings(None, env=env))) as svc:
        model = next(iter(svc.service.resident))
        async with AsyncClient("vae", url=svc.url) as client:
            for side in args.sizes:
                latent = torch.randn(
                    1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(side)
                )

                def decode_to_cpu(latent: torch.Tensor = latent) -> None:
                    model.decode(latent.to(model.device)).cpu()
                    sync(model.device)

                async def in_process() -> None:
                    # On a compute thread of its own, as ComfyUI's worker thread runs it.
                    await local_thread.run(decode_to_cpu)

                async def over_http(latent: torch.Tensor = latent) -> None:
                    await client.call("decode", {"latent": latent}, {"model": "bench-vae"})

                local, remote = [], []
                for _ in range(args.rounds):  # alternate, so drift hits both alike
                    local += await timed(in_process, args.repeats)
                    remote += await timed(over_http, args.repeats)
                row = {
                    "pixels": f"{side}x{side}",
                    "in_process_ms": median_ms(local),
                    "http_ms": median_ms(remote),
                }
                row["overhead_ms"] = row["http_ms"] - row["in_process_ms"]
                row["ratio"] = row["http_ms"] / row["in_process_ms"]
                rows.append(row)
    local_thread.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", action="store_true", help="small random-weight VAE on the CPU (CI smoke run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in pixels")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.small:
        args.device, args.dtype = "cpu", "fp32"
    args.sizes = args.sizes or ([128, 256] if args.small else [512, 1024])
    with tempfile.TemporaryDirectory(prefix="luna-bench-") as tmp:
        rows = asyncio.run(measure(args, Path(tmp)))
    print_table(rows, ["pixels", "in_process_ms", "http_ms", "overhead_ms", "ratio"])
    meta = {"sizes": args.sizes, "repeats": args.repeats * args.rounds}
    path = write_results("vae_overhead", args.small, meta, rows, str(select_device(args.device)))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
