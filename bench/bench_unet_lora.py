"""Per-request LoRA cost: step time with 0, 1 and 2 rank-32 LoRAs, and a mixed batch of 4 different
stacks (merged into one forward) against the same 4 requests sent one after another; through the
service's captured CUDA graphs (LoRA from the static bank: `step_ms`) and eager (`eager_step_ms`).

    python bench/bench_unet_lora.py            # SDXL 1024² on the GPU
    python bench/bench_unet_lora.py --small    # CPU smoke run (CI)
"""

from __future__ import annotations

import asyncio

from luna_stack.client.http import AsyncClient

from .common import median_ms, print_table, timed
from .unet_common import defaults, lora_files, model_file, models_root, parser, save, serve, step_inputs


async def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=32)
    args = defaults(p.parse_args())
    with models_root(args) as root:
        model = model_file(args, root)
        a, b, c = lora_files(args, root, 3, args.rank)
        stacks = {
            "0 LoRAs": [],
            "1 LoRA": [{"name": a, "strength": 0.8}],
            "2 LoRAs": [{"name": a, "strength": 0.8}, {"name": b, "strength": -0.4}],
        }
        mixed = [[], stacks["1 LoRA"], stacks["2 LoRAs"], [{"name": c, "strength": 1.0}]]
        measured: dict[str, list[tuple[str, float]]] = {}
        for mode, graphs in (("graphs", 1), ("eager", 0)):
            env = {"graphs": graphs, "graph_buckets": "2,4,8"}  # 4 CFG clients: 8 rows at most
            async with (
                serve(args, root, max_batch=8, max_delay_ms=5, **env) as (url, service),
                AsyncClient("unet", url=url) as client,
            ):
                await client.call("load", {}, {"model": model})
                loaded = next(iter(service.resident))
                inputs = step_inputs(loaded, 2, args.latent, seed=0)
                device = str(loaded.device)
                measured[mode] = await _cases(url, client, model, inputs, stacks, mixed, args.steps)
                print(mode, [(c, round(ms, 2)) for c, ms in measured[mode]], flush=True)
                del loaded, service
        rows = []
        base = measured["graphs"][0][1]
        for (case, ms), (_, eager_ms) in zip(measured["graphs"], measured["eager"], strict=True):
            rows.append(
                {
                    "case": case,
                    "step_ms": ms,
                    "vs_0_loras": ms / base if case != "sequential/batched" else 0.0,
                    "eager_step_ms": eager_ms,
                    "eager/graph": eager_ms / ms,
                }
            )
    print(f"UNet {args.family} {args.size}, latent {args.latent}², CFG, rank-{args.rank} LoRAs, {device}")
    print_table(rows, ["case", "step_ms", "vs_0_loras", "eager_step_ms", "eager/graph"])
    print("results:", save("unet_lora", args, rows, device))


async def _cases(
    url: str, client: AsyncClient, model: str, inputs: dict, stacks: dict, mixed: list, steps: int
) -> list[tuple[str, float]]:
    def step(stack: list) -> object:
        return client.call("step", inputs, {"model": model, "lora": stack})

    out = [(label, median_ms(await timed(lambda s=stack: step(s), steps))) for label, stack in stacks.items()]
    sequential = median_ms(await timed(lambda: _sequential(client, inputs, model, mixed), steps))
    pool = [AsyncClient("unet", url=url, name=f"mixed-{i}") for i in range(len(mixed))]
    try:
        concurrent = median_ms(await timed(lambda: _concurrent(pool, inputs, model, mixed), steps))
    finally:
        for other in pool:
            await other.close()
    out += [("4 stacks sequential", sequential), ("4 stacks one batch", concurrent)]
    out.append(("sequential/batched", sequential / concurrent))
    return out


async def _sequential(client: AsyncClient, inputs: dict, model: str, stacks: list) -> None:
    for stack in stacks:
        await client.call("step", inputs, {"model": model, "lora": stack})


async def _concurrent(pool: list[AsyncClient], inputs: dict, model: str, stacks: list) -> None:
    replies = await asyncio.gather(
        *(c.call("step", inputs, {"model": model, "lora": s}) for c, s in zip(pool, stacks, strict=True))
    )
    if max(params["batch_rows"] for _, params in replies) < 2 * len(stacks):
        print("note: the 4 stacks did not all share one forward this round")


if __name__ == "__main__":
    asyncio.run(main())
