"""Flux.1 on a real GPU (make test-gpu): bf16 and fp8 steps through captured CUDA graphs equal eager with
and without LoRA stacks from the static bank and with ControlNet slots; the service picks bf16 for Flux
by default on CUDA and its graphed steps equal graphs off; a full-size Flux.1-dev holds one resident copy
(bf16 ~23.8 GB, fp8 half) and loading never holds a second one.

Tolerance: graph and eager runs differ by kernels picked for other row counts (padded buckets):
max |Δ| / max |eager| < 2e-2 in bf16 (8 mantissa bits); each LoRA moves its rows by far more.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures_flux import write_flux
from luna_stack.lora import attach_side_paths
from luna_stack.server.metrics import Metrics
from luna_stack.unet import convert
from luna_stack.unet.family import build as build_unet
from luna_stack.unet.flux.arch import FluxModel, FluxShape
from luna_stack.unet.flux.layout import FLUX1_DEV
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.step_runner import build_runner

from .conftest import make_settings
from .test_flux import eager_flux, flux_loras, flux_requests, step_inputs
from .test_graphs import graph_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda:0")
DEV = "unet/flux-dev-small.safetensors"
TOL = 2e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def flux(request, models_dir: Path, tmp_path_factory) -> FluxModel:
    path = models_dir / DEV
    if request.param == "fp8":
        path, _ = convert.write_copy(path, "fp8", tmp_path_factory.mktemp("fp8") / "flux-dev-fp8.safetensors")
    model = load_diffusion_model(request.param, path, "bf16", CUDA)
    assert model.precision == request.param and model.dtype == torch.bfloat16
    attach_side_paths(model.module)
    return model


def test_graph_replays_equal_eager_with_lora_and_control(flux: FluxModel, tmp_path: Path) -> None:
    a, b = flux_loras(flux, tmp_path)
    metrics = Metrics("unet")
    runner = build_runner(flux, graph_config(buckets=(1, 2, 4), slots=2, rank=8), metrics.graph_forwards)
    graphs = flux.precision != "fp8"  # fp8 steps eager (step_runner.py)
    assert runner.cuda_graphs and runner.enabled == graphs
    shape = FluxShape(10, 12, 7, (("input.1", 30), ("output.0", 30)))
    runner.warm_up([shape])
    assert len(runner.describe()["graphs"]) == (12 if graphs else 0)  # 3 buckets x (none, slot 0, 1, both)
    cycle = [((a, 0.8),), (), ((a, 0.5), (b, -1.0)), ((b, 1.2),)]
    for rows in range(1, 5):
        for lora in (False, True):
            requests = flux_requests(
                flux, shape, [cycle[i % 4] if lora else () for i in range(rows)], 10 * rows
            )
            parts = {n: [r[0].tensors[n] for r in requests] for n in requests[0][0].tensors}
            out = runner.run(shape, parts, [(1, r[1]) for r in requests]).clone()
            ref = eager_flux(flux, shape, requests)
            assert out.dtype == torch.bfloat16 and rel_err(out, ref) < TOL, (rows, lora, rel_err(out, ref))
            if lora:
                base = eager_flux(flux, shape, [(r[0], ()) for r in requests])
                assert rel_err(ref[:1], base[:1]) > 2 * TOL  # the LoRA acts: 7.9 % on the H200
    assert runner.eager == {}


async def test_service_defaults_flux_to_bf16_and_graphs_equal_graphs_off(models_dir, start_service) -> None:
    common = {"LUNA_DEVICE": "cuda:0", "LUNA_DTYPE": "fp16", "LUNA_UNET_MAX_DELAY_MS": "200"}
    graphs = start_service(
        build_unet,
        make_settings(
            models_dir, LUNA_UNET_GRAPH_BUCKETS="1,2,4", LUNA_UNET_GRAPH_CAPTURE="first_use", **common
        ),
    )
    eager = start_service(build_unet, make_settings(models_dir, LUNA_UNET_GRAPHS="false", **common))
    cpu = load_diffusion_model("r", models_dir / DEV, "fp32", torch.device("cpu"))
    requests = [(step_inputs(cpu, h=16, w=16, tokens=9, seed=70 + i), {"model": DEV}) for i in range(4)]

    async def all_at_once(url: str) -> list:
        clients = [AsyncClient("unet", url=url, name=f"c{i}") for i in range(len(requests))]
        try:
            return await asyncio.gather(*(c.call("step", *r) for c, r in zip(clients, requests, strict=True)))
        finally:
            for c in clients:
                await c.close()

    for _ in range(2):  # the first round captures, the second replays
        for (out, params), (ref, _) in zip(
            await all_at_once(graphs.url), await all_at_once(eager.url), strict=True
        ):
            assert params["batch_rows"] in (2, 4) and rel_err(out["out"], ref["out"]) < TOL
    async with AsyncClient("unet", url=graphs.url) as client:
        models = await client.get_json("/v1/unet/models")
        status = await client.get_json("/v1/status")
    (flux,) = [m for m in models["loaded"] if m["name"] == DEV]
    assert flux["precision"] == "bf16" and flux["dtype"] == "bfloat16"  # the service's fp16 is for SD
    assert status["precision_by_architecture"]["flux"] == "bf16"
    shapes = {g["shape"] for m in status["graphs"]["models"] for g in m["graphs"]}
    assert "16x16 ctx9" in shapes


@pytest.mark.slow
def test_full_size_flux_dev_holds_one_resident_copy(tmp_path: Path) -> None:
    """Flux.1-dev's real sizes (11.9 B parameters): bf16 and fp8 resident, one step each."""
    source = write_flux(tmp_path / "flux1-dev.safetensors", "dev", "full")
    fp8, _ = convert.write_copy(source, "fp8", tmp_path / "flux1-dev-fp8.safetensors")
    sizes = {}
    for precision, path in (("bf16", source), ("fp8", fp8)):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model = load_diffusion_model(precision, path, "bf16", CUDA)
        assert model.cfg == FLUX1_DEV and model.precision == precision
        resident = torch.cuda.memory_allocated() - before
        peak = torch.cuda.max_memory_allocated() - before
        assert abs(resident - model.nbytes) < 0.01 * model.nbytes  # nothing else left on the device
        assert peak < 1.1 * model.nbytes, (precision, peak, model.nbytes)  # never a second copy
        inputs = step_inputs(model, rows=1, h=64, w=64, tokens=256, seed=1)
        step = model.parse_step(inputs, {})
        with torch.inference_mode():
            out = model.forward(step.shape, step.tensors)
        assert out.shape == (1, 16, 64, 64) and bool(torch.isfinite(out).all())
        sizes[precision] = model.nbytes
        print(f"{precision}: {model.nbytes / 2**30:.2f} GiB resident, load peak {peak / 2**30:.2f} GiB")
        del model, out
    assert 23.0e9 < sizes["bf16"] < 24.5e9
    assert sizes["fp8"] < 0.52 * sizes["bf16"]  # every Linear e4m3; biases and norms bf16
