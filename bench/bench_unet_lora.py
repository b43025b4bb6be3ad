"""Per-request LoRA cost: step time with 0, 1 and 2 rank-32 LoRAs, and a mixed batch of 4 different
stacks (merged into one forward) against the same 4 requests sent one after another.

    python bench/bench_unet_lora.py            # SDXL 1024² on the GPU
    python bench/bench_unet_lora.py --small    # CPU smoke run (CI)
"""

from __future__ import annotations

import asyncio

from luna_stack.core.client import AsyncClient

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
        async with (
            serve(args, root, max_batch=16, max_delay_ms=5) as (url, service),
            AsyncClient("unet", url=url) as client,
        ):
            await client.call("load", {}, {"model": model})
            loaded = next(iter(service.resident))
            inputs = step_inputs(loaded, 2, args.latent, seed=0)
            device = str(loaded.device)

            def step(stack: list) -> object:
                return client.call("step", inputs, {"model": model, "lora": stack})

            base = None
            rows = []
            for label, stack in stacks.items():
                ms = median_ms(await timed(lambda s=stack: step(s), args.steps))
                base = base or ms
                rows.append({"case": label, "step_ms": ms, "vs_0_loras": ms / base})

            sequential = median_ms(await timed(lambda: _sequential(client, inputs, model, mixed), args.steps))
            pool = [AsyncClient("unet", url=url, name=f"mixed-{i}") for i in range(len(mixed))]
            try:
                concurrent = median_ms(
                    await timed(lambda: _concurrent(pool, inputs, model, mixed), args.steps)
                )
            finally:
                for other in pool:
                    await other.close()
            rows.append(
                {"case": "4 stacks sequential", "step_ms": sequential, "vs_0_loras": sequential / base}
            )
            rows.append(
                {"case": "4 stacks one batch", "step_ms": concurrent, "vs_0_loras": concurrent / base}
            )
            rows.append({"case": "sequential/batched", "step_ms": sequential / concurrent, "vs_0_loras": 0.0})
    print(f"UNet {args.family} {args.size}, latent {args.latent}², CFG, rank-{args.rank} LoRAs, {device}")
    print_table(rows, ["case", "step_ms", "vs_0_loras"])
    print("results:", save("unet_lora", args, rows, device))


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
