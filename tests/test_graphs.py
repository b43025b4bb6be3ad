"""Graph runner logic on the CPU: bucket rounding and padding, output slicing, eager fallbacks and their
metric, the LoRA bank (slots, LRU, scale table, side-path math) against the eager side path, settings.

Without CUDA the runner "replays" by running the forward on its static buffers (cuda_graphs=False), so
everything but the capture itself is exercised here; tests/test_graphs_gpu.py captures for real. The
helpers below are shared with it. fp32 on the CPU: GEMMs are not batch-size invariant (~1e-6), so padded
batches are compared with a tolerance.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from luna_stack.clip.conditioning import EncodeJob, encode_jobs
from luna_stack.clip.encoder_graphs import build_runner as build_clip_runner
from luna_stack.clip.encoder_graphs import default_layers, graphed_forward
from luna_stack.clip.models import ClipModel, load_clip_model
from luna_stack.clip.tokenize import CLIP_G, CLIP_L
from luna_stack.config import load_settings
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.gpu.graph_config import GraphConfig, parse_buckets, round_up
from luna_stack.gpu.graphs import GraphRunner
from luna_stack.lora import LoraCache, ResolvedLora, attach_side_paths, row_groups
from luna_stack.lora.bank import LoraBank
from luna_stack.lora.stack import LoraStack
from luna_stack.server.batcher import Batcher
from luna_stack.server.executor import GpuExecutor
from luna_stack.server.metrics import Metrics
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.sd_unet import SdUnet, StepShape
from luna_stack.unet.step import unet_forward
from luna_stack.unet.step_runner import build_runner
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import ConfigError

from .test_clip_conditioning import WEIGHTED
from .test_clip_service import _chunks
from .test_unet_support import step_inputs

SDXL = "unet/sdxl-small-unet.safetensors"
Request = tuple[dict[str, torch.Tensor], tuple[tuple[ResolvedLora, float], ...]]
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


# -- shared with test_graphs_gpu.py ---------------------------------------------------------------------
def graph_config(
    buckets: Sequence[int] = (1, 2, 4), slots: int = 2, rank: int = 8, shapes: int = 4
) -> GraphConfig:
    """Graphs captured when first needed (the batch waits) and kept untimed: the CPU tests and the GPU
    correctness tests need every key to replay."""
    return GraphConfig(True, tuple(buckets), "first_use", shapes, slots, rank, min_gain=None)


def unet_loras(models_dir: Path, model: SdUnet, folder: Path) -> dict[str, ResolvedLora]:
    """Adapters for `model`: a, b, c fit a bank of rank 8; big has rank 16; locon adapts kxk convs."""
    cache = LoraCache(1 << 30, model.device, model.dtype)
    specs = {
        "a": dict(fmt="kohya", rank=4, unet_ldm_names=True, seed=1),
        "b": dict(fmt="peft", rank=8, seed=2),
        "c": dict(fmt="kohya", rank=2, alpha=1.0, seed=3),
        "big": dict(fmt="peft", rank=16, seed=4),
        "locon": dict(fmt="peft", rank=4, targets="all", seed=5),
    }
    out = {}
    for name, spec in specs.items():
        path = folder / f"{name}.safetensors"
        write_lora(path, model.module, "unet", **spec)  # type: ignore[arg-type]
        out[name] = cache.resolve(path, model.module, "unet")
    return out


def step_requests(model: SdUnet, stacks: Sequence[tuple], rows: int = 2, seed: int = 0, size: int = 8):
    return [
        (step_inputs(model.module, batch=rows, height=size, width=size, seed=seed + i), tuple(stack))
        for i, stack in enumerate(stacks)
    ]


def eager_step(model: SdUnet, requests: Sequence[Request]) -> torch.Tensor:
    """The service's eager forward: inputs concatenated, stacks through the hooks' row plan."""

    def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([r[0][name] for r in requests]).to(model.device, dtype)

    y = cat("y", model.dtype) if "y" in requests[0][0] else None
    plan = row_groups([(r[0]["x"].shape[0], r[1]) for r in requests])
    with torch.inference_mode(), attach_side_paths(model.module).plan(plan):
        return unet_forward(
            model.module,
            cat("x", model.dtype),
            cat("timesteps", torch.float32),
            cat("context", model.dtype),
            y,
        )


def graph_step(runner: GraphRunner, requests: Sequence[Request], *, eager: bool = False) -> torch.Tensor:
    """The service's path through the runner; fails the test if the runner ran the batch eager, or, with
    `eager`, if it did not."""
    parts = {name: [r[0][name] for r in requests] for name in requests[0][0]}
    stacks = [(r[0]["x"].shape[0], r[1]) for r in requests]
    before = sum(runner.eager.values())
    first = requests[0][0]
    out = runner.run(StepShape(*first["x"].shape[2:], first["context"].shape[1]), parts, stacks)
    ran_eager = sum(runner.eager.values()) > before
    assert ran_eager == eager, f"eager forwards: {runner.eager}"
    return out.clone()  # a static buffer: the next replay overwrites it


def eager_forwards(metrics: Metrics, op: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "luna_graph_forwards_total", {"op": op, "path": "eager", "reason": reason}
    )
    return value or 0.0


# -- settings and rounding ------------------------------------------------------------------------------
def test_round_up_picks_the_smallest_bucket_that_holds_the_rows() -> None:
    buckets = parse_buckets(["16", " 2", "4", "1", "8", "4"], "unet.graph_buckets")
    assert buckets == (1, 2, 4, 8, 16)
    assert [round_up(buckets, n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, None]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LUNA_UNET_GRAPH_BUCKETS": "0,2"}, "unet.graph_buckets must list positive batch sizes"),
        ({"LUNA_CLIP_GRAPH_BUCKETS": "2,two"}, "LUNA_CLIP_GRAPH_BUCKETS"),
        (
            {"LUNA_UNET_GRAPH_CAPTURE": "eager"},
            "unet.graph_capture must be one of background, start, first_use, lazy",
        ),
        ({"LUNA_UNET_GRAPH_LATENTS": "128"}, "unet.graph_latents entries look like 128x128"),
        ({"LUNA_UNET_LORA_SLOTS": "-1"}, "unet.lora_slots must be >= 0"),
        ({"LUNA_CLIP_LORA_MAX_RANK": "0"}, "clip.lora_max_rank must be >= 1"),
    ],
)
def test_bad_graph_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env=env)


def test_graph_settings_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("unet:\n  graph_buckets: [2, 8]\n  graph_capture: lazy\n  lora_slots: 0\n")
    settings = load_settings(path, env={"LUNA_CLIP_GRAPHS": "false", "LUNA_CLIP_GRAPH_BUCKETS": "4,1"})
    unet, clip = settings.sections["unet"].graph, settings.sections["clip"].graph
    assert (unet.buckets, unet.capture, unet.lora_slots, unet.enabled) == ((2, 8), "first_use", 0, True)
    assert (clip.buckets, clip.enabled, clip.lora_rank) == ((1, 4), False, 64)
    assert (clip.capture, clip.background, clip.min_gain, clip.idle_ms) == ("background", True, 0.05, 25.0)


# -- batcher --------------------------------------------------------------------------------------------
async def _batches(buckets: tuple[int, ...] | None, requests: int, rows: int = 2) -> list[int]:
    ran: list[int] = []

    def run(key, items):
        ran.append(sum(items))
        return list(items)

    executor = GpuExecutor("t")
    batcher = Batcher("t", run, executor, max_rows=16, max_delay_ms=500, buckets=buckets)
    try:
        await asyncio.gather(
            *(batcher.enqueue("k", rows, rows=rows, client=f"c{i}") for i in range(requests))
        )
    finally:
        await batcher.close()
        executor.shutdown()
    return ran


async def test_batcher_leaves_rows_for_the_next_batch_rather_than_pad_a_third_of_a_bucket() -> None:
    assert await _batches(None, 5) == [10]  # no buckets: one batch, as before
    assert await _batches((1, 2, 4, 8, 16), 5) == [8, 2]  # 10 rows would pad to 16
    assert await _batches((1, 2, 4, 8, 16), 6) == [12]  # 12 of 16: padded
    assert await _batches((2, 4), 3) == [4, 2]  # above the largest bucket: cut to it


# -- the UNet through the runner ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet(models_dir: Path) -> SdUnet:
    model = load_diffusion_model("sdxl", models_dir / SDXL, "fp32", torch.device("cpu"))
    attach_side_paths(model.module)
    return model


@pytest.fixture(scope="module")
def loras(models_dir: Path, unet: SdUnet, tmp_path_factory) -> dict[str, ResolvedLora]:
    return unet_loras(models_dir, unet, tmp_path_factory.mktemp("graph_loras"))


def test_every_bucket_pads_and_slices_like_the_eager_forward(unet: SdUnet) -> None:
    metrics = Metrics("unet")
    runner = build_runner(unet, graph_config(buckets=(1, 2, 4)), metrics.graph_forwards)
    assert not runner.cuda_graphs  # CPU: replays run the forward on the static buffers
    for rows in (4, 3, 1, 2):  # 3 after 4: the padded row holds the previous batch's data
        requests = step_requests(unet, [()], rows=rows, seed=rows)
        out = graph_step(runner, requests)
        assert out.shape == requests[0][0]["x"].shape
        torch.testing.assert_close(out, eager_step(unet, requests), **FP32_TOL)
    status = runner.describe()
    assert sorted((g["rows"], g["replays"]) for g in status["graphs"]) == [(1, 1), (2, 1), (4, 2)]
    assert status["eager"] == {}
    # More rows than the largest bucket: eager, counted.
    requests = step_requests(unet, [(), ()], rows=3)
    out = graph_step(runner, requests, eager=True)
    torch.testing.assert_close(out, eager_step(unet, requests), **FP32_TOL)
    assert eager_forwards(metrics, "unet", "rows") == 1
    assert (
        metrics.registry.get_sample_value(
            "luna_graph_forwards_total", {"op": "unet", "path": "graph", "reason": ""}
        )
        == 4
    )


def test_shapes_beyond_the_limit_run_eager(unet: SdUnet) -> None:
    metrics = Metrics("unet")
    runner = build_runner(unet, graph_config(shapes=1), metrics.graph_forwards)
    graph_step(runner, step_requests(unet, [()], size=8))
    other = step_requests(unet, [()], size=16)
    torch.testing.assert_close(graph_step(runner, other, eager=True), eager_step(unet, other), **FP32_TOL)
    assert eager_forwards(metrics, "unet", "shapes") == 1
    assert [g["shape"] for g in runner.describe()["graphs"]] == ["8x8 ctx77"]


def test_lora_stacks_through_the_bank_equal_the_eager_side_path(unet: SdUnet, loras) -> None:
    a, b, c = loras["a"], loras["b"], loras["c"]
    runner = build_runner(unet, graph_config(buckets=(2, 8), slots=2, rank=8))
    # Three stacks and a request without LoRA in one padded batch (7 rows -> bucket 8).
    requests = step_requests(unet, [((a, 0.8),), (), ((a, 0.5), (b, -1.0))], rows=2)
    requests.append(step_requests(unet, [((b, 1.2),)], rows=1, seed=9)[0])
    out = graph_step(runner, requests)
    torch.testing.assert_close(out, eager_step(unet, requests), **FP32_TOL)
    base = eager_step(unet, [(r[0], ()) for r in requests])
    assert (out[:2] - base[:2]).abs().max() > 1e-2  # the adapters visibly act...
    torch.testing.assert_close(out[2:4], base[2:4], **FP32_TOL)  # ...on their own rows only
    # Slots change hands (LRU): c (rank 2) takes a's slot, a comes back, c takes b's (rank 8). The ranks
    # an earlier owner wrote beyond the new one's must be zeroed, or these would differ from eager.
    # One adapter replays the graph of its slot alone; several, the graph of all slots.
    for _ in range(2):
        for stack in [((c, 1.0), (b, 0.3)), ((a, -0.7),), ((c, 2.0),)]:
            requests = step_requests(unet, [stack], seed=20)
            torch.testing.assert_close(graph_step(runner, requests), eager_step(unet, requests), **FP32_TOL)
    bank = runner.bank
    assert bank is not None and bank.describe()["fills"] == 7
    assert bank.describe()["resident"] == ["a.safetensors", "c.safetensors"]
    lora_graphs = [
        (g["rows"], g["lora_slots"], g["replays"]) for g in runner.describe()["graphs"] if g["lora"]
    ]
    assert lora_graphs == [(2, [0, 1], 2), (2, [0, 2], 2), (2, [1, 2], 2), (8, [0, 2], 1)]  # none re-captured


@pytest.mark.parametrize(
    ("stack", "why"),
    [
        (("a", "b", "c"), "three distinct adapters, two slots"),
        (("big",), "rank 16 above the bank's 8"),
        (("locon",), "adapts 3x3 convs"),
    ],
)
def test_stacks_that_do_not_fit_the_bank_run_eager_and_exact(unet: SdUnet, loras, stack, why) -> None:
    metrics = Metrics("unet")
    runner = build_runner(unet, graph_config(slots=2, rank=8), metrics.graph_forwards)
    requests = step_requests(unet, [tuple((loras[n], 0.7) for n in stack)], seed=30)
    expected = eager_step(unet, requests)
    out = graph_step(runner, requests, eager=True)
    assert torch.equal(out, expected), why
    assert eager_forwards(metrics, "unet", "lora") == 1, why
    assert runner.bank is not None and runner.bank.describe()["resident"] == [None, None]  # nothing evicted


def test_scale_table_lays_strengths_out_per_row_and_slot(unet: SdUnet, loras) -> None:
    a, b = loras["a"], loras["b"]
    bank = LoraBank(attach_side_paths(unet.module), count=3, rank=8, dtype=torch.float32, device="cpu")
    stacks = [(2, ((a, 0.5),)), (1, ()), (2, ((a, 0.25), (b, 2.0))), (1, ((a, 1.0), (a, 1.0)))]
    table, window = bank.scale_table(stacks, rows=8) or (None, None)
    assert table is not None and table.shape == (8, 24) and window == (0, 3)
    slot = {lora: s for s, lora in enumerate((a, b))}  # filled in order of first use
    expected = torch.zeros(8, 24)
    for rows, values in [((0, 2), {a: 0.5}), ((3, 5), {a: 0.25, b: 2.0}), ((5, 6), {a: 2.0})]:
        for lora, v in values.items():
            expected[rows[0] : rows[1], slot[lora] * 8 : (slot[lora] + 1) * 8] = v
    assert torch.equal(table, expected)
    assert bank.describe()["resident"] == ["a.safetensors", "b.safetensors", None]
    # One adapter: only its slot's columns, for the graph that reads that slot alone.
    table, window = bank.scale_table([(1, ((b, 0.5),)), (1, ())], rows=2) or (None, None)
    assert window == (1, 2) and table is not None and torch.equal(table, torch.tensor([[0.5] * 8, [0.0] * 8]))
    # The bank's own buffers: a's rank-4 factors in slot 0, alpha/rank folded into up, zero padding.
    name, f = next(iter(a.factors.items()))
    assert torch.equal(bank.down[name][:4], f.down.reshape(4, -1)) and not bank.down[name][4:8].any()
    torch.testing.assert_close(bank.up[name][:, :4], f.up.reshape(-1, 4) * f.scale)


def test_lru_keeps_the_adapters_in_use(unet: SdUnet, loras) -> None:
    a, b, c = loras["a"], loras["b"], loras["c"]
    bank = LoraBank(attach_side_paths(unet.module), count=2, rank=8, dtype=torch.float32, device="cpu")
    assert bank.assign([a, b]) == {a: 0, b: 1}
    assert bank.assign([b]) == {b: 1}  # a is now the least recently used
    assert bank.assign([c, b]) == {c: 0, b: 1}
    assert bank.assign([a, b, c]) is None  # three distinct: nothing changes
    assert bank.describe()["resident"] == ["c.safetensors", "b.safetensors"]
    assert (bank.fills, bank.hits) == (3, 2)


# -- CLIP through the runner ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(models_dir: Path) -> ClipModel:
    return load_clip_model("clip/clip_l.safetensors+clip/clip_g.safetensors", ModelRoots([models_dir]))


def clip_loras(model: ClipModel, folder: Path, device, dtype) -> list[LoraStack]:
    """Two LoRA files with CLIP-L and CLIP-G parts, as the service's per-request stacks."""
    cache = LoraCache(1 << 30, device, dtype)
    stacks = []
    for i, fmt in enumerate(("kohya", "peft")):
        per_encoder = {}
        for key, component in (("l", "clip_l"), ("g", "clip_g")):
            path = folder / f"clip-{i}-{key}.safetensors"
            write_lora(path, model.encoders[key].model, component, fmt, rank=4, seed=40 + i)  # type: ignore[arg-type]
            per_encoder[key] = ((cache.resolve(path, model.encoders[key].model, component), 0.9 - i),)
        stacks.append(LoraStack((("x", float(i)),), per_encoder))
    return stacks


def clip_encode(
    model: ClipModel, jobs: list[EncodeJob], runners=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    def lora_plan(encoder, row_stacks):
        rows = [(1, s.part(encoder.kind)) for s in row_stacks]
        return model.slots[encoder.kind].plan(row_groups(rows))

    forward = graphed_forward(runners, model.slots) if runners else None
    return encode_jobs(model.encoders, model.family, jobs, lora_plan, forward)


def clip_jobs(stacks: Sequence[LoraStack]) -> list[EncodeJob]:
    texts = [WEIGHTED, "a red fox", "(snow:1.3) forest at night"]
    return [
        EncodeJob({"l": _chunks(t, CLIP_L), "g": _chunks(t, CLIP_G)}, None, stacks[i % len(stacks)])
        for i, t in enumerate(texts)
    ]


def test_clip_encoders_through_the_runner_equal_eager(clip: ClipModel, tmp_path: Path) -> None:
    metrics = Metrics("clip")
    config = graph_config(buckets=(2, 4, 8), slots=2, rank=8)
    runners = {
        k: build_clip_runner(e, "sdxl", config, metrics.graph_forwards) for k, e in clip.encoders.items()
    }
    for key, runner in runners.items():
        runner.warm_up([default_layers(clip.encoders[key], clip.family)])
    with_lora = clip_loras(clip, tmp_path, "cpu", torch.float32)
    for stacks in ([LoraStack(())], [LoraStack(()), *with_lora]):
        jobs = clip_jobs(stacks)
        for (cond, pooled), (ref_cond, ref_pooled) in zip(
            clip_encode(clip, jobs, runners), clip_encode(clip, jobs), strict=True
        ):
            torch.testing.assert_close(cond, ref_cond, **FP32_TOL)
            torch.testing.assert_close(pooled, ref_pooled, **FP32_TOL)
    assert eager_forwards(metrics, "clip", "lora") == 0
    counts = {k: sum(g["replays"] for g in r.describe()["graphs"]) for k, r in runners.items()}
    assert counts == {"l": 2, "g": 2}
    no_lora = clip_encode(clip, clip_jobs([LoraStack(())]), runners)
    lora = clip_encode(clip, clip_jobs([with_lora[0]]), runners)
    assert (lora[0][0] - no_lora[0][0]).abs().max() > 1e-2
    # clip_skip -1 reads another layer set: a shape of its own, captured on first use.
    job = EncodeJob({"l": _chunks("a cat", CLIP_L), "g": _chunks("a cat", CLIP_G)}, -1)
    torch.testing.assert_close(
        clip_encode(clip, [job], runners)[0][0], clip_encode(clip, [job])[0][0], **FP32_TOL
    )
    layers = clip.encoders["g"].num_layers
    assert {g["shape"] for g in runners["g"].describe()["graphs"]} == {
        f"layers {layers - 2}",
        f"layers {layers - 1}",
    }


def test_bench_graphs_runs_small() -> None:
    """The in-process graph benchmark still runs (small CPU fixtures) and writes its table."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_graphs", "--small", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((root / "bench" / "results" / "graphs-small.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"unet sdxl", "clip L+G"}
    assert all(r["rel_err"] < 1e-4 and r["graph_ms"] > 0 for r in rows)
