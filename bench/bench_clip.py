"""CLIP L+G (SDXL) encode: N prompts merged in one forward against N encodes one after another (eager, and
merged through captured CUDA graphs), and one encode through the service over HTTP (graphs on and off)
against the same encode eager in-process. Issue 8's target: service with graphs <= 0.3x eager in-process.

Writes random-weight clip_l / clip_g files (full size: the real SDXL text encoders' shapes; `--small`:
the CPU fixtures), loads them as the service does, and prints the tables; results go to
bench/results/clip-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from luna_stack.client.http import AsyncClient
from luna_stack.clip.bpe import shared_bpe
from luna_stack.clip.conditioning import EncodeJob, encode_jobs
from luna_stack.clip.encoder_graphs import graphed_forward
from luna_stack.clip.family import build
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, tokenize
from luna_stack.config import load_settings
from luna_stack.devtools.embedded import EmbeddedService
from luna_stack.devtools.fixtures import write_clip
from luna_stack.gpu.device import select_device

from .common import median_ms, print_table, sync, timed, write_results

PROMPT = "a (cinematic:1.2) photo of a red fox in a snowy forest, golden hour, ((highly detailed)), 85mm"
MODEL = "clip_l.safetensors+clip_g.safetensors"


async def measure(args: argparse.Namespace, root: Path) -> tuple[list[dict], list[dict]]:
    size = "small" if args.small else "full"
    write_clip(root / "clip" / "clip_l.safetensors", "l", size, dtype=torch.float16)
    write_clip(root / "clip" / "clip_g.safetensors", "g", size, dtype=torch.float16)
    env = {
        "LUNA_MODEL_ROOTS": str(root),
        "LUNA_DEVICE": args.device,
        "LUNA_DTYPE": args.dtype,
        "LUNA_CLIP_PRELOAD": MODEL,
        "LUNA_CLIP_CACHE": "false",
        "LUNA_CLIP_GRAPH_CAPTURE": "start",  # steady state: captured before ready
    }
    bpe = shared_bpe()

    def job(i: int) -> EncodeJob:
        text = f"{PROMPT}, variant {i}"
        return EncodeJob({s.key: tokenize(text, s, bpe, None, [], 64) for s in (CLIP_L, CLIP_G)})

    merging, overhead = [], []
    eager_env = {**env, "LUNA_CLIP_GRAPHS": "false"}
    with (
        EmbeddedService(build(load_settings(None, env=env))) as svc,
        EmbeddedService(build(load_settings(None, env=eager_env))) as eager_svc,
    ):
        model = next(iter(svc.service.resident))
        device = svc.service.device
        graphs = graphed_forward(model.graphs, model.slots) if model.graphs else None

        async def forward(jobs: list[EncodeJob], graphed: bool = False) -> None:
            encode_jobs(model.encoders, "sdxl", jobs, forward=graphs if graphed else None)
            sync(device)

        for n in args.batches:
            jobs = [job(i) for i in range(n)]
            merged = median_ms(await timed(lambda jobs=jobs: forward(jobs), args.repeats, warmup=3))
            graph = median_ms(await timed(lambda jobs=jobs: forward(jobs, True), args.repeats, warmup=3))

            async def one_by_one(jobs: list[EncodeJob] = jobs) -> None:
                for j in jobs:
                    await forward([j])

            sequential = median_ms(await timed(one_by_one, max(3, args.repeats // 4)))
            merging.append(
                {
                    "prompts": n,
                    "merged_ms": merged,
                    "sequential_ms": sequential,
                    "graph_ms": graph,
                    "sequential/merged": sequential / merged,
                    "merged/graph": merged / graph,
                }
            )
        params = {"model": MODEL, "text": PROMPT}
        in_process = median_ms(await timed(lambda: forward([job(0)]), args.repeats, warmup=3))
        for path, url in (("http graphs", svc.url), ("http eager", eager_svc.url)):
            async with AsyncClient("clip", url=url) as client:
                http = median_ms(
                    await timed(lambda c=client: c.call("encode", None, params), args.repeats, warmup=3)
                )
            overhead.append(
                {"path": path, "in_process_ms": in_process, "service_ms": http, "ratio": http / in_process}
            )
        graph = median_ms(await timed(lambda: forward([job(0)], True), args.repeats, warmup=3))
        overhead.append(
            {
                "path": "in-process graphs",
                "in_process_ms": in_process,
                "service_ms": graph,
                "ratio": graph / in_process,
            }
        )
    return merging, overhead


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--small", action="store_true", help="small random-weight encoders on the CPU (CI smoke run)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.small:
        args.device, args.dtype = "cpu", "fp32"
    args.batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="luna-bench-") as tmp:
        merging, overhead = asyncio.run(measure(args, Path(tmp)))
    print_table(
        merging, ["prompts", "merged_ms", "sequential_ms", "graph_ms", "sequential/merged", "merged/graph"]
    )
    print_table(overhead, ["path", "in_process_ms", "service_ms", "ratio"])
    meta = {"dtype": args.dtype, "repeats": args.repeats, "wall_s": round(time.perf_counter() - started, 1)}
    path = write_results("clip", args.small, meta, merging + overhead, str(select_device(args.device)))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
