"""When graphs are captured (issue 15, cold start and memory): a service is ready once its weights are
resident, a batch whose graph is not captured yet runs eager ("pending") and its key is captured while the
service is idle, requested keys before configured ones; LoRA graphs only for slot windows a LoRA batch
used, the bank allocated by the first LoRA batch; graph_capture=start still captures before ready; the
no-gain rule on given timings.

On the CPU the services keep graphs off, so the service tests run the unet and clip families with their
runners on (`cuda_graphs=False`: static buffers, the same keys, queue and background work, no capture).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.clip.family import ClipFamily
from luna_stack.config import Settings
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.gpu.graphs import capture_one, keeps_graph
from luna_stack.server.family import ServiceContext
from luna_stack.server.metrics import Metrics
from luna_stack.server.service import Service
from luna_stack.unet.family import UnetFamily
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.sd_unet import SdUnet, StepShape
from luna_stack.unet.step_runner import build_runner

from .conftest import make_settings
from .test_graphs import SDXL, eager_forwards, eager_step, graph_step, step_requests, unet_loras
from .test_unet_support import ldm_unet, reference_step, reference_unet, step_inputs

FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
CLIP_PAIR = "clip/clip_l.safetensors+clip/clip_g.safetensors"


# -- the no-gain rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("eager_ms", "replay_ms", "min_gain", "kept"),
    [
        (286.0, 283.0, 0.05, False),  # SDXL 1024² x16 on the H200: GPU-bound, 1 % is no gain
        (297.8, 295.8, 0.05, False),  # x16 on the H100
        (155.2, 152.0, 0.05, False),  # x8: 2 %
        (106.3, 27.8, 0.05, True),  # x1: 3.8x
        (100.0, 95.0, 0.05, True),  # exactly 5 % faster
        (100.0, 95.1, 0.05, False),
        (100.0, 100.0, 0.0, True),  # min_gain 0 keeps a graph that is not slower...
        (100.0, 100.1, 0.0, False),  # ...and drops a slower one
        (100.0, 150.0, None, True),  # None: every graph kept, untimed
    ],
)
def test_a_graph_is_kept_only_if_its_replay_gains_min_gain(eager_ms, replay_ms, min_gain, kept) -> None:
    assert keeps_graph(eager_ms / 1000, replay_ms / 1000, min_gain) is kept


# -- the runner: queue and background work ----------------------------------------------------------------
def background_config(buckets=(1, 2), slots: int = 2, rank: int = 8, shapes: int = 4) -> GraphConfig:
    return GraphConfig(True, tuple(buckets), "background", shapes, slots, rank)


@pytest.fixture(scope="module")
def unet(models_dir: Path) -> SdUnet:
    return load_diffusion_model("sdxl", models_dir / SDXL, "fp32", torch.device("cpu"))


def test_a_miss_runs_eager_pending_and_is_captured_by_background_work(unet: SdUnet) -> None:
    metrics = Metrics("unet")
    runner = build_runner(unet, background_config(), metrics.graph_forwards)
    requests = step_requests(unet, [()], rows=2, seed=1)
    first = graph_step(runner, requests, eager=True)
    assert eager_forwards(metrics, "unet", "pending") == 1
    status = runner.describe()
    assert (status["graphs"], status["pending"]) == ([], ["8x8 ctx77 x2"])
    assert status["weights_bytes"] == unet.nbytes > 0 and status["bank_bytes"] == 0
    graph_step(runner, requests, eager=True)  # still pending: queued once
    assert eager_forwards(metrics, "unet", "pending") == 2 and runner.queued == 1
    assert capture_one([runner]) is False  # captured, nothing left
    assert [(g["shape"], g["rows"], g["lora"]) for g in runner.describe()["graphs"]] == [
        ("8x8 ctx77", 2, False)
    ]
    replayed = graph_step(runner, requests)
    assert torch.equal(replayed, first)  # bucket 2 = 2 rows: the same forward on the same values
    assert torch.equal(first, eager_step(unet, requests))
    assert runner.describe()["replays"] == 1 and runner.describe()["pending"] == []


def test_a_key_stays_pending_until_its_capture_is_done(unet: SdUnet) -> None:
    """/v1/status lists the key being captured as pending (a benchmark or an operator waiting for the graphs
    the traffic asked for must not see an empty list while the compute thread is still capturing)."""
    runner = build_runner(unet, background_config(), Metrics("unet").graph_forwards)
    seen: list[list[str]] = []
    allocate = runner.allocate

    def observed(shape, rows):  # the capture allocates its static inputs first
        seen.append(runner.describe()["pending"])
        return allocate(shape, rows)

    runner.allocate = observed
    graph_step(runner, step_requests(unet, [()], rows=2, seed=1), eager=True)
    assert capture_one([runner]) is False
    assert seen == [["8x8 ctx77 x2"]] and runner.describe()["pending"] == []


def test_requested_keys_are_captured_before_configured_ones(unet: SdUnet) -> None:
    runner = build_runner(unet, background_config(buckets=(1, 2)))
    runner.plan([StepShape(8, 8)])  # configured: every bucket, largest first
    assert runner.describe()["pending"] == ["8x8 ctx77 x2", "8x8 ctx77 x1"]
    graph_step(runner, step_requests(unet, [()], rows=1, size=16), eager=True)
    graph_step(runner, step_requests(unet, [()], rows=1, size=8), eager=True)  # configured, now asked for
    assert runner.describe()["pending"] == ["16x16 ctx77 x1", "8x8 ctx77 x1", "8x8 ctx77 x2"]
    order = []
    while True:
        more = capture_one([runner])
        order.append([(g["shape"], g["rows"]) for g in runner.describe()["graphs"]])
        if not more:
            break
    assert order == [
        [("16x16 ctx77", 1)],
        [("16x16 ctx77", 1), ("8x8 ctx77", 1)],
        [("16x16 ctx77", 1), ("8x8 ctx77", 1), ("8x8 ctx77", 2)],
    ]
    assert capture_one([runner]) is False and runner.queued == 0


def test_queued_shapes_count_towards_max_shapes(unet: SdUnet) -> None:
    metrics = Metrics("unet")
    runner = build_runner(unet, background_config(shapes=1), metrics.graph_forwards)
    graph_step(runner, step_requests(unet, [()], size=8), eager=True)
    graph_step(runner, step_requests(unet, [()], size=16), eager=True)
    assert eager_forwards(metrics, "unet", "pending") == 1 and eager_forwards(metrics, "unet", "shapes") == 1
    assert runner.describe()["pending"] == ["8x8 ctx77 x2"]


def test_lora_windows_are_captured_only_when_a_lora_batch_used_them(unet: SdUnet, tmp_path: Path) -> None:
    loras = unet_loras(Path(), unet, tmp_path)
    runner = build_runner(unet, background_config(buckets=(2,), slots=2, rank=8))
    bank = runner.bank
    assert bank is not None and not bank.allocated and bank.nbytes == 0
    graph_step(runner, step_requests(unet, [()]), eager=True)
    capture_one([runner])
    assert bank.nbytes == 0  # graphs without LoRA never allocate the bank
    requests = step_requests(unet, [((loras["a"], 0.8),)], seed=3)
    first = graph_step(runner, requests, eager=True)  # exact, through the side-path hooks
    assert bank.allocated and bank.nbytes > 0
    assert runner.describe()["bank_bytes"] == bank.nbytes
    assert runner.describe()["pending"] == ["8x8 ctx77 x2 +LoRA slots 0..0"]
    assert capture_one([runner]) is False
    lora_graphs = [g["lora_slots"] for g in runner.describe()["graphs"] if g["lora"]]
    assert lora_graphs == [[0, 1]]  # slot 0 alone: no other window was captured
    torch.testing.assert_close(graph_step(runner, requests), first, **FP32_TOL)


# -- services ---------------------------------------------------------------------------------------------
class RunnersOnUnet(UnetFamily):
    """The unet family with its graph runners on although the device is the CPU (static buffers)."""

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        self.graphs_on = True


class RunnersOnClip(ClipFamily):
    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        self.graphs_on = True


def unet_service(settings: Settings) -> Service:
    return Service(settings, RunnersOnUnet)


def clip_service(settings: Settings) -> Service:
    return Service(settings, RunnersOnClip)


def graph_forwards(service: Service, op: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "luna_graph_forwards_total", {"op": op, "path": "graph", "reason": ""}
    )
    return value or 0.0


async def wait_status(client: AsyncClient, done: Callable[[dict], bool], timeout: float = 60) -> dict:
    """The first /v1/status `done` accepts, polled (background captures need the service idle)."""
    deadline = time.monotonic() + timeout
    while not done(status := await client.status()):
        assert time.monotonic() < deadline, f"not done after {timeout} s: {status['graphs']}"
        await asyncio.sleep(0.05)
    return status


def graph_keys(status: dict) -> set[tuple[str, int, bool]]:
    return {(g["shape"], g["rows"], g["lora"]) for m in status["graphs"]["models"] for g in m["graphs"]}


@pytest.fixture(scope="module")
def sdxl_ref(models_dir: Path) -> torch.nn.Module:
    return reference_unet(ldm_unet(models_dir / SDXL), "sdxl")


@pytest.fixture(scope="module")
def attn_lora(models_dir: Path, sdxl_ref) -> str:
    """An SDXL LoRA on attention Linears only: it fits the bank."""
    name = "capture-sdxl-attn.safetensors"
    write_lora(models_dir / "loras" / name, sdxl_ref, "unet", "kohya", rank=4, targets="attn", seed=7)
    return name


async def test_ready_before_any_capture_then_graphs_from_idle_time(
    models_dir, start_service, sdxl_ref, attn_lora
) -> None:
    settings = make_settings(
        models_dir, LUNA_UNET_PRELOAD=SDXL, LUNA_UNET_GRAPH_BUCKETS="1,2", LUNA_UNET_GRAPH_IDLE_MS="20"
    )
    svc = start_service(unet_service, settings)
    service = svc.service
    async with AsyncClient("unet", url=svc.url) as client:
        status = await client.status()
        (model,) = status["graphs"]["models"]
        assert status["graphs"]["capture"] == "background"
        # Ready with the weights alone: nothing captured or queued (no configured shapes), no bank.
        assert (model["graphs"], model["pending"], model["bytes"]) == ([], [], 0)
        assert model["weights_bytes"] > 0 and model["bank_bytes"] == 0
        assert model["lora_bank"]["allocated"] is False

        inputs = step_inputs(sdxl_ref, batch=2, seed=21)
        expected = reference_step(sdxl_ref, inputs)
        out, params = await client.call("step", inputs, {"model": SDXL})
        assert params["batch_rows"] == 2 and torch.equal(out["out"], expected)
        assert (
            eager_forwards(service.metrics, "unet", "pending") == 1 and graph_forwards(service, "unet") == 0
        )

        status = await wait_status(client, lambda s: ("8x8 ctx77", 2, False) in graph_keys(s))
        (model,) = status["graphs"]["models"]
        assert len(model["graphs"]) == 1 and model["pending"] == []  # only the key traffic asked for
        assert model["lora_bank"]["allocated"] is False  # no LoRA window before a LoRA batch
        out, _ = await client.call("step", inputs, {"model": SDXL})
        assert torch.equal(out["out"], expected)  # the replay, bitwise the eager result
        assert (
            graph_forwards(service, "unet") == 1 and eager_forwards(service.metrics, "unet", "pending") == 1
        )

        lora = {"model": SDXL, "lora": [{"name": attn_lora, "strength": 0.8}]}
        first, _ = await client.call("step", inputs, lora)
        assert eager_forwards(service.metrics, "unet", "pending") == 2
        assert not torch.equal(first["out"], expected)  # the LoRA acts
        status = await wait_status(client, lambda s: ("8x8 ctx77", 2, True) in graph_keys(s))
        (model,) = status["graphs"]["models"]
        assert [g["lora_slots"] for g in model["graphs"] if g["lora"]] == [[0, 1]]
        assert model["lora_bank"]["allocated"] is True and model["bank_bytes"] > 0
        again, _ = await client.call("step", inputs, lora)
        torch.testing.assert_close(again["out"], first["out"], **FP32_TOL)  # bank vs side path: order
        assert (
            graph_forwards(service, "unet") == 2 and eager_forwards(service.metrics, "unet", "pending") == 2
        )


async def test_graph_capture_start_captures_before_ready(models_dir, start_service, sdxl_ref) -> None:
    settings = make_settings(
        models_dir, LUNA_UNET_PRELOAD=SDXL, LUNA_UNET_GRAPH_BUCKETS="1,2", LUNA_UNET_GRAPH_CAPTURE="start"
    )
    svc = start_service(unet_service, settings)
    async with AsyncClient("unet", url=svc.url) as client:
        status = await client.status()
        (model,) = status["graphs"]["models"]
        shapes = {(g["shape"], g["rows"], g["lora"]) for g in model["graphs"]}
        # The family's native latent, every bucket, before ready; LoRA windows are never captured ahead.
        assert shapes == {("128x128 ctx77", 1, False), ("128x128 ctx77", 2, False)}
        assert model["lora_bank"]["allocated"] is False
        # Another shape is captured when first met, the request waiting: it replays at once.
        inputs = step_inputs(sdxl_ref, batch=2, seed=22)
        out, _ = await client.call("step", inputs, {"model": SDXL})
        assert torch.equal(out["out"], reference_step(sdxl_ref, inputs))
        (model,) = (await client.status())["graphs"]["models"]
    assert ("8x8 ctx77", 2, False) in {(g["shape"], g["rows"], g["lora"]) for g in model["graphs"]}
    assert graph_forwards(svc.service, "unet") == 1 and model["eager"] == {}


async def test_clip_encodes_eager_until_idle_then_replays(models_dir, start_service) -> None:
    settings = make_settings(
        models_dir, LUNA_CLIP_PRELOAD=CLIP_PAIR, LUNA_CLIP_GRAPH_BUCKETS="1,2", LUNA_CLIP_GRAPH_IDLE_MS="20"
    )
    svc = start_service(clip_service, settings)
    params = {"model": CLIP_PAIR, "text": "a red fox in the snow"}
    async with AsyncClient("clip", url=svc.url) as client:
        status = await client.status()
        assert [m["graphs"] for m in status["graphs"]["models"]] == [[], []]
        eager, _ = await client.call("encode", params=params)
        assert eager_forwards(svc.service.metrics, "clip", "pending") == 2  # CLIP-L and CLIP-G
        status = await wait_status(client, lambda s: all(m["graphs"] for m in s["graphs"]["models"]))
        assert [[g["rows"] for g in m["graphs"]] for m in status["graphs"]["models"]] == [[1], [1]]
        replayed, _ = await client.call("encode", params=params)
    assert graph_forwards(svc.service, "clip") == 2
    assert torch.equal(replayed["cond"], eager["cond"]) and torch.equal(replayed["pooled"], eager["pooled"])


async def test_captures_wait_while_requests_keep_coming(models_dir, start_service, sdxl_ref) -> None:
    """Steps every 0.3 s never leave the service idle for graph_idle_ms (3 s): nothing is captured until
    they stop."""
    settings = make_settings(
        models_dir, LUNA_UNET_PRELOAD=SDXL, LUNA_UNET_GRAPH_BUCKETS="2", LUNA_UNET_GRAPH_IDLE_MS="3000"
    )
    svc = start_service(unet_service, settings)
    inputs = step_inputs(sdxl_ref, batch=2, seed=23)
    async with AsyncClient("unet", url=svc.url) as client:
        for _ in range(6):
            await client.call("step", inputs, {"model": SDXL})
            (model,) = (await client.status())["graphs"]["models"]
            assert (model["graphs"], model["pending"]) == ([], ["8x8 ctx77 x2"])
            await asyncio.sleep(0.3)
        assert eager_forwards(svc.service.metrics, "unet", "pending") == 6
        await wait_status(client, lambda s: bool(graph_keys(s)))
        out, _ = await client.call("step", inputs, {"model": SDXL})
    assert graph_forwards(svc.service, "unet") == 1 and torch.equal(
        out["out"], reference_step(sdxl_ref, inputs)
    )
