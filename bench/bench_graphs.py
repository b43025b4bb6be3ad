"""Captured CUDA graphs in process, no service: per bucket, the eager forward against its graph replay (and
the memory each graph costs), a rank-32 LoRA through the eager side path against the graph's static
bank, for the UNet and for CLIP L+G; with --compile, manual capture against torch.compile (mode
reduce-overhead, and inductor + manual capture) for a 2-row UNet step and CLIP L+G.

    python -m bench.bench_graphs                 # SDXL 1024² and CLIP L+G on the GPU
    python -m bench.bench_graphs --compile       # ... and the torch.compile comparison (minutes)
    python -m bench.bench_graphs --small         # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from luna_stack.clip.encoder_graphs import Layers
from luna_stack.clip.encoder_graphs import build_runner as build_clip_runner
from luna_stack.clip.encoders import ClipEncoder
from luna_stack.clip.models import load_clip_model
from luna_stack.devtools.fixtures import write_clip
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.gpu.device import select_device
from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.gpu.graphs import GraphRunner
from luna_stack.lora import LoraCache, attach_side_paths, row_groups
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.sd_unet import SdUnet, StepShape
from luna_stack.unet.step import unet_forward
from luna_stack.unet.step_runner import build_runner
from luna_stack.weights.paths import ModelRoots

from .common import median_ms, print_table, sync, timed_sync, write_results
from .unet_common import defaults, lora_files, model_file, models_root, parser, step_inputs

MiB = 2**20


def synced_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median ms of `fn` with the device synchronised after each call."""
    return median_ms(timed_sync(lambda: (fn(), sync(device)), repeats, warmup=3))


def timing_row(
    model: str,
    rows: int,
    eager: Callable[..., Any],
    graph: Callable[..., Any],
    device: torch.device,
    repeats: int,
    memory: tuple[float, float],
    err: float,
) -> dict[str, Any]:
    """Eager vs graph, without and with the LoRA stack (`fn(True)`), and each graph's memory."""
    eager_ms = synced_ms(eager, device, repeats)
    graph_ms = synced_ms(graph, device, repeats)
    lora_eager_ms = synced_ms(lambda: eager(True), device, repeats)
    lora_graph_ms = synced_ms(lambda: graph(True), device, repeats)
    return {
        "model": model,
        "rows": rows,
        "eager_ms": eager_ms,
        "graph_ms": graph_ms,
        "eager/graph": eager_ms / graph_ms,
        "lora_eager_ms": lora_eager_ms,
        "lora_graph_ms": lora_graph_ms,
        "lora eager/graph": lora_eager_ms / lora_graph_ms,
        "graph_MiB": memory[0],
        "lora_graph_MiB": memory[1],
        "rel_err": err,
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def replay(runner: GraphRunner, *args: Any) -> Any:
    """runner.run, failing when the runner ran the batch eager instead of replaying a graph."""
    before = sum(runner.eager.values())
    out = runner.run(*args)
    if sum(runner.eager.values()) != before:
        raise RuntimeError(f"the graph runner fell back to eager: {runner.eager}")
    return out


def graph_memory(runner: GraphRunner, rows: int, lora: bool) -> float:
    return (
        next(g["bytes"] for g in runner.describe()["graphs"] if g["rows"] == rows and g["lora"] == lora) / MiB
    )


def unet_rows(args: argparse.Namespace, root: Path, model: SdUnet) -> list[dict[str, Any]]:
    (lora_name,) = lora_files(args, root, 1, args.rank)
    cache = LoraCache(1 << 32, model.device, model.dtype)
    lora = cache.resolve(root / "loras" / lora_name, model.module, "unet")
    slots = attach_side_paths(model.module)
    config = GraphConfig(
        True, tuple(args.buckets), "start", 8, args.lora_slots, args.lora_max_rank, min_gain=None
    )
    runner = build_runner(model, config)
    shape = StepShape(args.latent, args.latent)
    started = time.perf_counter()
    runner.warm_up([shape])
    print(
        f"UNet: captured {len(runner.describe()['graphs'])} graphs in {time.perf_counter() - started:.1f} s"
    )
    rows = []
    for b in args.buckets:
        inputs = {k: v.to(model.device) for k, v in step_inputs(model, b, args.latent, seed=b).items()}
        inputs["timesteps"] = inputs["timesteps"].float()
        parts = {k: [v] for k, v in inputs.items()}
        stack = ((lora, 0.8),)

        def eager(
            with_lora: bool = False, inputs: dict = inputs, b: int = b, stack: tuple = stack
        ) -> torch.Tensor:
            plan = row_groups([(b, stack if with_lora else ())])
            with torch.inference_mode(), slots.plan(plan):
                return unet_forward(
                    model.module, inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y")
                )

        def graph(
            with_lora: bool = False, parts: dict = parts, b: int = b, stack: tuple = stack
        ) -> torch.Tensor:
            return replay(runner, shape, parts, [(b, stack if with_lora else ())])

        err = rel_err(graph(), eager())
        lora_err = rel_err(graph(True), eager(True))
        rows.append(
            timing_row(
                f"unet {args.family}" + (" NHWC" if args.channels_last else ""),
                b,
                eager,
                graph,
                model.device,
                args.repeats,
                (graph_memory(runner, b, False), graph_memory(runner, b, True)),
                max(err, lora_err),
            )
        )
        print(rows[-1], flush=True)
    bank = runner.bank.describe() if runner.bank is not None else {}
    slots_desc = f"{bank.get('slots')} slots x rank {bank.get('max_rank')}"
    print(f"UNet LoRA bank: {slots_desc}, {bank.get('bytes', 0) / MiB:.0f} MiB")
    return rows


def clip_setup(args: argparse.Namespace, root: Path, device: torch.device, dtype: torch.dtype):
    size = "small" if args.small else "full"
    for key in ("l", "g"):
        if not (root / "clip" / f"clip_{key}.safetensors").exists():
            write_clip(root / "clip" / f"clip_{key}.safetensors", key, size, dtype=torch.float16)
    model = load_clip_model(
        "clip/clip_l.safetensors+clip/clip_g.safetensors", ModelRoots([root]), device=device, dtype=dtype
    )
    keep = {k: (e.num_layers - 2,) for k, e in model.encoders.items()}  # SDXL's penultimate layer
    return model, keep


def clip_rows(args: argparse.Namespace, root: Path, device: torch.device, dtype: torch.dtype) -> list[dict]:
    model, keep = clip_setup(args, root, device, dtype)
    cache = LoraCache(1 << 32, device, dtype)
    config = GraphConfig(
        True, tuple(args.clip_buckets), "start", 8, args.lora_slots, args.lora_max_rank, min_gain=None
    )
    runners, stacks = {}, {}
    for key, enc in model.encoders.items():
        path = root / "loras" / f"bench-clip-{key}-r{args.rank}.safetensors"
        write_lora(path, enc.model, f"clip_{key}", "kohya", rank=args.rank, seed=7)  # type: ignore[arg-type]
        stacks[key] = ((cache.resolve(path, enc.model, f"clip_{key}"), 0.8),)  # type: ignore[arg-type]
        runners[key] = build_clip_runner(enc, "bench", config)
        runners[key].warm_up([Layers(keep[key])])
    rows = []
    for b in args.clip_buckets:
        gen = torch.Generator().manual_seed(b)
        embeds = {
            k: (torch.randn(b, e.length, e.width, generator=gen) * 0.02).to(device, dtype)
            for k, e in model.encoders.items()
        }

        def eager(with_lora: bool = False, embeds: dict = embeds, b: int = b) -> list:
            outs = []
            for k, enc in model.encoders.items():
                with model.slots[k].plan(row_groups([(b, stacks[k] if with_lora else ())])):
                    outs.append(enc.forward(embeds[k], keep[k]).hidden[keep[k][0]])
            return outs

        def graph(with_lora: bool = False, embeds: dict = embeds, b: int = b) -> list:
            return [
                replay(
                    runners[k],
                    Layers(keep[k]),
                    {"embeds": [embeds[k]]},
                    [(b, stacks[k] if with_lora else ())],
                )
                .hidden[keep[k][0]]
                .clone()
                for k in model.encoders
            ]

        err = max(rel_err(o, r) for o, r in zip(graph() + graph(True), eager() + eager(True), strict=True))
        memory = tuple(sum(graph_memory(r, b, lora) for r in runners.values()) for lora in (False, True))
        rows.append(timing_row("clip L+G", b, eager, graph, device, args.repeats, memory, err))
        print(rows[-1], flush=True)
    return rows


def compile_rows(
    args: argparse.Namespace,
    root: Path,
    model: SdUnet | None,
    device: torch.device,
    dtype: torch.dtype,
    done: Callable[[list[dict[str, Any]]], None],
    include_clip: bool = True,
) -> list[dict[str, Any]]:
    """2-row UNet step (unless no model) and CLIP L+G (2 rows), LoRA hooks detached: eager, manual
    capture, reduce-overhead, inductor (args.compile_mode) + manual capture."""
    clip, keep = clip_setup(args, root, device, dtype)
    for slots in clip.slots.values():
        slots.detach()
    embeds = {
        k: torch.randn(2, e.length, e.width, device=device, dtype=dtype) * 0.02
        for k, e in clip.encoders.items()
    }

    # ClipEncoder.forward without its inference_mode decorator: dynamo cannot functionalize inference
    # tensors (buffers), so every variant here runs under no_grad.
    encoder_forward = ClipEncoder.forward.__wrapped__  # type: ignore[attr-defined]

    def clip_step(l_in: torch.Tensor, g_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = clip.encoders
        return (
            encoder_forward(enc["l"], l_in, keep["l"]).hidden[keep["l"][0]],
            encoder_forward(enc["g"], g_in, keep["g"]).hidden[keep["g"][0]],
        )

    cases: dict[str, tuple[Callable[..., Any], list]] = {}
    if include_clip:
        cases["clip L+G x2"] = (clip_step, [embeds["l"], embeds["g"]])
    if model is not None:  # compiling the SDXL UNet takes minutes
        unet = model.module
        attach_side_paths(unet).detach()
        inputs = {k: v.to(device) for k, v in step_inputs(model, 2, args.latent, seed=0).items()}
        inputs["timesteps"] = inputs["timesteps"].float()

        def unet_step(
            x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None
        ) -> torch.Tensor:
            return unet_forward(unet, x, t, c, y)

        unet_args = [inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y")]
        cases[f"unet {args.family} x2"] = (unet_step, unet_args)  # after CLIP: its compile takes minutes
    rows = []
    for name, (fn, args_in) in cases.items():

        def first(out: Any) -> torch.Tensor:
            return out if isinstance(out, torch.Tensor) else out[1]

        with torch.no_grad():
            ref = first(fn(*args_in)).clone()
        results: dict[str, tuple[float, float, float]] = {}  # variant -> (ms, compile s, rel err)

        def measure(
            variant: str, call: Callable[[], Any], setup_s: float = 0.0, name: str = name, ref=ref
        ) -> None:
            with torch.no_grad():
                err = rel_err(first(call()), ref)
                ms = synced_ms(call, device, args.repeats)
            results[variant] = (ms, setup_s, err)  # noqa: B023 - used within this iteration only
            print(name, variant, f"{ms:.2f} ms, setup {setup_s:.1f} s, rel err {err:.1e}", flush=True)

        measure("eager", lambda fn=fn, a=args_in: fn(*a))
        measure("manual graph", *_manual(fn, args_in, device))
        for variant, run_variant in (
            ("compile reduce-overhead", _reduce_overhead),
            (f"compile {args.compile_mode} + manual graph", _inductor_then_capture),
        ):
            try:
                measure(variant, *run_variant(fn, args_in, device, args.compile_mode))
            except Exception as exc:  # report what failed, measure the rest
                print(name, variant, "failed:", repr(exc)[:300], flush=True)
            torch._dynamo.reset()
        eager_ms = results["eager"][0]
        for variant, (ms, setup_s, err) in results.items():
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "ms": ms,
                    "eager/variant": eager_ms / ms,
                    "setup_s": setup_s,
                    "rel_err": err,
                }
            )
        done(rows)  # each case's rows are saved as soon as it is measured: compiling takes minutes
        torch._dynamo.reset()
    return rows


def _reduce_overhead(fn: Callable[..., Any], args_in: list, device: torch.device, _mode: str):
    compiled = torch.compile(fn, mode="reduce-overhead")
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):  # compile, then cudagraph-tree warm-up and recording
            compiled(*args_in)
    sync(device)
    return (lambda: compiled(*args_in)), time.perf_counter() - started


def _inductor_then_capture(fn: Callable[..., Any], args_in: list, device: torch.device, mode: str):
    """Inductor's kernels (no cudagraphs) captured by hand: torch.cuda.graph around the compiled call."""
    compiled = torch.compile(fn, mode=mode)
    static = [a.clone() if a is not None else None for a in args_in]
    started = time.perf_counter()
    with torch.no_grad():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                compiled(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(*static)
    sync(device)

    def call() -> Any:
        for dst, src in zip(static, args_in, strict=True):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        return out

    return call, time.perf_counter() - started


def _manual(fn: Callable[..., Any], args_in: list, device: torch.device) -> tuple[Callable[[], Any], float]:
    """`fn` captured through the services' GraphRunner (one bucket = the batch); returns (call, setup s)."""
    names = [f"in{i}" for i in range(len(args_in))]
    present = {n: a for n, a in zip(names, args_in, strict=True) if a is not None}
    rows = args_in[0].shape[0]

    def allocate(_shape: Any, bucket: int) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(a) for n, a in present.items()}

    def forward(_shape: Any, inputs: dict[str, torch.Tensor]) -> Any:
        return fn(*[inputs.get(n) for n in names])

    config = GraphConfig(True, (rows,), "start", 1, 0, 1, min_gain=None)
    runner = GraphRunner(
        "bench", "bench", forward, allocate, device, config, cuda_graphs=device.type == "cuda"
    )
    started = time.perf_counter()
    runner.warm_up(["x"])
    setup = time.perf_counter() - started
    parts = {n: [a] for n, a in present.items()}
    return (lambda: replay(runner, "x", parts, [(rows, ())])), setup


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--buckets", default="1,2,4,8,16")
    p.add_argument("--clip-buckets", default="1,2,4,8,16,32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--lora-slots", type=int, default=4)
    p.add_argument("--lora-max-rank", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also compare torch.compile (minutes)")
    p.add_argument("--compile-only", action="store_true", help="only the torch.compile comparison")
    p.add_argument("--compile-mode", default="default", help="inductor mode for compile + manual capture")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="UNet weights and activations in NHWC")
    p.add_argument("--no-unet", action="store_true")
    args = defaults(p.parse_args())
    if args.small:
        args.repeats = min(args.repeats, 2)
        args.buckets, args.clip_buckets = "1,2", "1,2"
    args.buckets = [int(b) for b in args.buckets.split(",")]
    args.clip_buckets = [int(b) for b in args.clip_buckets.split(",")]
    device = select_device(args.device)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    compiled: list[dict[str, Any]] = []
    precision = args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]

    def save(compiled: list[dict[str, Any]] | None = None) -> Path:
        meta = {
            "family": args.family,
            "latent": args.latent,
            "dtype": precision,
            "repeats": args.repeats,
            "lora_rank": args.rank,
            "lora_bank": [args.lora_slots, args.lora_max_rank],
            "compile_mode": args.compile_mode if args.compile or args.compile_only else None,
            "wall_s": round(time.perf_counter() - started, 1),
        }
        if compiled is not None:  # the compile comparison has a results file of its own
            return write_results("graphs_compile", args.small, meta, compiled, str(device))
        return write_results("graphs", args.small, meta, rows, str(device))

    with models_root(args) as root:
        model = None
        if not args.no_unet and not args.compile_only:
            name = model_file(args, root)
            model = load_diffusion_model(name, root / name, precision, device)
            if args.channels_last:
                model.module.to(memory_format=torch.channels_last)
            rows += unet_rows(args, root, model)
            save()
        if not args.no_clip and not args.compile_only:
            rows += clip_rows(args, root, device, dtype)
            save()
        if (args.compile or args.compile_only) and device.type == "cuda":
            # CLIP first (seconds), then the UNet (minutes); results saved after each.
            compiled = compile_rows(args, root, None, device, dtype, save)
            if not args.no_unet:
                if model is None:
                    name = model_file(args, root)
                    model = load_diffusion_model(name, root / name, precision, device)
                done = compiled

                def save_unet(more: list[dict[str, Any]]) -> None:
                    save(done + more)

                compiled = done + compile_rows(
                    args, root, model, device, dtype, save_unet, include_clip=False
                )
    columns = ["model", "rows", "eager_ms", "graph_ms", "eager/graph", "lora_eager_ms", "lora_graph_ms"]
    print(f"graphs vs eager, {device} ({precision})")
    if rows:
        print_table(rows, [*columns, "lora eager/graph", "graph_MiB", "lora_graph_MiB", "rel_err"])
    if compiled:
        print_table(compiled, ["model", "variant", "ms", "eager/variant", "setup_s", "rel_err"])
        print("results:", save(compiled))
    if rows:
        print("results:", save())


if __name__ == "__main__":
    main()
