"""Aggregate UNet step throughput with 1/2/4/8 concurrent clients (CFG: 2 rows per step): the service with
captured CUDA graphs (batching on), eager with batching on and off, against the eager in-process forward
of the same total batch. `graph_step/in_process` is the step time through the service with graphs over
the eager in-process step (issue 8's single-client target: <= 0.5).

    python bench/bench_unet_throughput.py            # SDXL 1024² on the GPU
    python bench/bench_unet_throughput.py --small    # CPU smoke run (CI)
"""

from __future__ import annotations

import asyncio
import time

import torch

from luna_stack.client.http import AsyncClient
from luna_stack.unet.step import unet_forward

from .common import print_table, sync
from .unet_common import defaults, model_file, models_root, parser, save, serve, step_inputs


async def clients_throughput(url: str, model: str, inputs: dict, clients: int, steps: int) -> float:
    """Steps per second summed over `clients` clients, each sending `steps` steps back to back."""
    pool = [AsyncClient("unet", url=url, name=f"bench-{i}") for i in range(clients)]
    try:
        await asyncio.gather(*(c.call("step", inputs, {"model": model}) for c in pool))  # warm-up

        async def run(client: AsyncClient) -> None:
            for _ in range(steps):
                await client.call("step", inputs, {"model": model})

        start = time.perf_counter()
        await asyncio.gather(*(run(c) for c in pool))
        return clients * steps / (time.perf_counter() - start)
    finally:
        for c in pool:
            await c.close()


def in_process_throughput(loaded, inputs: dict, clients: int, steps: int) -> float:
    """Steps per second of one forward over all clients' rows, with no service in between."""
    device, dtype = loaded.device, loaded.dtype
    batch = {
        k: torch.cat([v] * clients).to(device, dtype if k != "timesteps" else torch.float32)
        for k, v in inputs.items()
    }

    def forward() -> None:
        with torch.inference_mode():
            unet_forward(loaded.module, batch["x"], batch["timesteps"], batch["context"], batch.get("y"))
        sync(device)

    forward()
    start = time.perf_counter()
    for _ in range(steps):
        forward()
    return clients * steps / (time.perf_counter() - start)


async def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    args = defaults(p.parse_args())
    counts = [int(c) for c in args.clients.split(",")]
    rows = []
    with models_root(args) as root:
        model = model_file(args, root)
        results: dict[str, dict[int, float]] = {}
        buckets = ",".join(str(b) for b in (1, 2, 4, 8, 16) if b <= 2 * max(counts)) or "1"
        # (label, batching, graphs); LoRA slots 0: no LoRA graphs to capture at start for this benchmark.
        for label, batching, graphs in (("graphs", 1, 1), ("batched", 1, 0), ("unbatched", 0, 0)):
            env = dict(batching=batching, graphs=graphs, graph_buckets=buckets, lora_slots=0)
            async with serve(args, root, max_batch=2 * max(counts), max_delay_ms=5, **env) as (url, service):
                async with AsyncClient("unet", url=url) as client:
                    await client.call("load", {}, {"model": model})
                loaded = next(iter(service.resident))
                inputs = step_inputs(loaded, 2, args.latent, seed=0)
                results[label] = {
                    n: await clients_throughput(url, model, inputs, n, args.steps) for n in counts
                }
                print(label, {n: round(v, 2) for n, v in results[label].items()}, flush=True)
                if label == "batched":
                    results["in_process"] = {
                        n: in_process_throughput(loaded, inputs, n, args.steps) for n in counts
                    }
                device = str(loaded.device)
                del loaded, service
    for n in counts:
        graphs, on, off = results["graphs"][n], results["batched"][n], results["unbatched"][n]
        local = results["in_process"][n]
        rows.append(
            {
                "clients": n,
                "graphs_steps_s": graphs,
                "batched_steps_s": on,
                "unbatched_steps_s": off,
                "in_process_steps_s": local,
                "graphs/batched": graphs / on,
                "batched/unbatched": on / off,
                "batched/in_process": on / local,
                "graph_step/in_process": local / graphs,
            }
        )
    print(f"UNet {args.family} {args.size}, latent {args.latent}², CFG (2 rows/step), {device}")
    print_table(rows, list(rows[0]))
    print("results:", save("unet_throughput", args, rows, device))


if __name__ == "__main__":
    asyncio.run(main())
