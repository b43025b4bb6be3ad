"""The UNet service over real HTTP on 127.0.0.1: step results, batching, per-request LoRA, bad input."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.unet.family import build
from luna_stack.unet.step import input_block_shapes
from luna_stack.wire.errors import LunaError

from .conftest import make_settings
from .test_unet_support import ldm_unet, reference_step, reference_unet, step_inputs

SD15 = "checkpoints/sd15-small.safetensors"
SDXL = "unet/sdxl-small-unet.safetensors"


@pytest.fixture(scope="module")
def refs(models_dir: Path) -> dict[str, torch.nn.Module]:
    return {
        SD15: reference_unet(ldm_unet(models_dir / SD15), "sd15"),
        SDXL: reference_unet(ldm_unet(models_dir / SDXL), "sdxl"),
    }


@pytest.fixture(scope="module")
def loras(models_dir: Path, refs) -> dict[str, dict]:
    """LoRA files in loras/ and the factors they hold (by diffusers module name)."""
    folder = models_dir / "loras"
    specs = {
        "sd15-kohya.safetensors": (SD15, "kohya", "attn", 1),
        "sd15-locon-peft.safetensors": (SD15, "peft", "all", 2),
        "sd15-ldm.safetensors": (SD15, "ldm", "attn", 3),
        "sdxl-kohya.safetensors": (SDXL, "kohya", "all", 4),
    }
    truth = {}
    for name, (model, fmt, targets, seed) in specs.items():
        truth[name] = write_lora(
            folder / name,
            refs[model],
            "unet",
            fmt,
            rank=4,
            alpha=2.0,
            targets=targets,
            seed=seed,
            unet_ldm_names=model == SDXL,
        )
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return truth


def merged(unet: torch.nn.Module, stack: list[tuple[dict, float]]) -> torch.nn.Module:
    """A private copy with each LoRA folded into the weights: W += s · (alpha/rank) · up @ down."""
    out = copy.deepcopy(unet)
    modules = dict(out.named_modules())
    for factors, strength in stack:
        for name, f in factors.items():
            weight = modules[name].weight
            delta = f.up.flatten(1) @ f.down.flatten(1)
            weight.data += strength * f.scale * delta.reshape(weight.shape)
    return out


@pytest.fixture
def service(models_dir, start_service, redis_url):
    settings = make_settings(
        models_dir, LUNA_REDIS_URL=redis_url, LUNA_UNET_MAX_DELAY_MS="100", LUNA_UNET_MAX_BATCH="16"
    )
    return start_service(build, settings)


async def test_step_over_http_equals_the_model_in_process(service, refs) -> None:
    async with AsyncClient("unet", url=service.url) as client:
        for model in (SD15, SDXL):
            inputs = step_inputs(refs[model], batch=2, height=8, width=10, seed=11)
            out, params = await client.call("step", inputs, {"model": model})
            assert params["model"] == model
            assert torch.equal(out["out"], reference_step(refs[model], inputs))
        # ControlNet residuals (SDXL, with y), fp16 in -> fp16 out in x's shape.
        ref = refs[SDXL]
        inputs = step_inputs(ref, batch=2, seed=12)
        shapes = input_block_shapes(ref, 8, 8)
        gen = torch.Generator().manual_seed(13)
        down = [torch.randn(2, *s, generator=gen) for s in shapes]
        mid = torch.randn(2, *shapes[-1], generator=gen)
        control = {f"control.output.{i}": t for i, t in enumerate(down)} | {"control.middle.0": mid}
        out, _ = await client.call("step", inputs | control, {"model": SDXL})
        expected = reference_step(
            ref, inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
        assert torch.equal(out["out"], expected)
        # One-row residuals (what T2I-Adapters send for a cond + uncond batch) apply to every row, as
        # ComfyUI's `h += residual` broadcasts them.
        one_row = {k: v[:1] for k, v in control.items()}
        out, _ = await client.call("step", inputs | one_row, {"model": SDXL})
        repeated = {k: v[:1].expand_as(v).contiguous() for k, v in control.items()}
        out_repeated, _ = await client.call("step", inputs | repeated, {"model": SDXL})
        assert torch.equal(out["out"], out_repeated["out"]) and not torch.equal(out["out"], expected)
        half = {k: v.half() if k != "timesteps" else v for k, v in inputs.items()}
        out, _ = await client.call("step", half, {"model": SDXL})
        assert out["out"].dtype == torch.float16 and out["out"].shape == inputs["x"].shape


async def test_status_shows_where_a_steps_time_goes(service, refs) -> None:
    """/v1/status latency_ms: each stage of the path (server/latency.py) with its recent median and p90;
    /metrics: luna_request_stage_seconds. The stages of a step, one after another, fit in the step."""
    async with AsyncClient("unet", url=service.url) as client:
        inputs = step_inputs(refs[SD15], batch=2, seed=21)
        slowest_ms = 0.0
        for _ in range(5):
            started = time.perf_counter()
            await client.call("step", inputs, {"model": SD15})
            slowest_ms = max(slowest_ms, (time.perf_counter() - started) * 1000)
        latency = (await client.get_json("/v1/status"))["latency_ms"]
        exposition = await (await (await client._http()).get(service.url + "/metrics")).text()
    assert set(latency) == {"inputs", "prepare", "queue", "compute", "reply"}  # settle: CUDA only
    assert all(v["samples"] == 5 and 0 <= v["p50_ms"] <= v["p90_ms"] for v in latency.values())
    assert latency["compute"]["p50_ms"] > 0
    assert sum(v["p50_ms"] for v in latency.values()) <= slowest_ms
    assert 'luna_request_stage_seconds_count{stage="compute"} 5.0' in exposition


async def test_lora_equals_a_privately_merged_copy(service, refs, loras) -> None:
    cases = [
        (SD15, [("sd15-kohya.safetensors", 0.8)]),
        (SD15, [("sd15-locon-peft.safetensors", -0.5)]),  # LoCon convs, negative strength
        (SD15, [("sd15-ldm.safetensors", 1.0), ("sd15-kohya.safetensors", 0.6)]),
        (SDXL, [("sdxl-kohya.safetensors", 1.2)]),  # kohya with LDM module paths, every layer
    ]
    async with AsyncClient("unet", url=service.url) as client:
        for model, stack in cases:
            inputs = step_inputs(refs[model], batch=2, seed=14)
            lora = [{"name": n, "strength": s} for n, s in stack]
            out, _ = await client.call("step", inputs, {"model": model, "lora": lora})
            reference = merged(refs[model], [(loras[n], s) for n, s in stack])
            expected = reference_step(reference, inputs)
            base = reference_step(refs[model], inputs)
            assert (expected - base).abs().max() > 1e-2  # the LoRA visibly changes the output
            torch.testing.assert_close(out["out"], expected, rtol=1e-4, atol=1e-4)
        status = await client.get_json("/v1/status")
    assert status["lora_cache"]["fp32"]["entries"] == len(loras)


async def _alone(client: AsyncClient, request: tuple[dict, dict]) -> torch.Tensor:
    out, params = await client.call("step", *request)
    assert params["batch_rows"] == request[0]["x"].shape[0]
    return out["out"]


def _eight_requests(refs) -> list[tuple[dict, dict]]:
    stacks = [
        [],
        [{"name": "sd15-kohya.safetensors", "strength": 0.8}],
        [{"name": "sd15-locon-peft.safetensors", "strength": -0.5}],
        [
            {"name": "sd15-kohya.safetensors", "strength": 0.8},
            {"name": "sd15-ldm.safetensors", "strength": 1.0},
        ],
    ]
    requests = []
    for i in range(8):
        height, width = ((8, 8), (8, 12))[i % 2]
        inputs = step_inputs(refs[SD15], batch=2, height=height, width=width, seed=100 + i)
        requests.append((inputs, {"model": SD15, "lora": stacks[i // 2]}))
    return requests


async def test_eight_concurrent_clients_each_get_what_they_get_alone(service, refs, loras) -> None:
    """Different shapes, timesteps and LoRA stacks; shapes batch separately, stacks share a forward.

    Merged forwards are compared with tolerance: CPU GEMMs are not batch-size invariant (~1e-6 apart)."""
    requests = _eight_requests(refs)
    clients = [AsyncClient("unet", url=service.url, name=f"client-{i}") for i in range(8)]
    try:
        alone = [await _alone(clients[i], r) for i, r in enumerate(requests)]
        replies = await asyncio.gather(*(c.call("step", *r) for c, r in zip(clients, requests, strict=True)))
        for (out, _), expected in zip(replies, alone, strict=True):
            torch.testing.assert_close(out["out"], expected, rtol=1e-5, atol=1e-5)
        assert max(params["batch_rows"] for _, params in replies) >= 4  # merged across clients
        assert all(params["batch_rows"] % 2 == 0 for _, params in replies)  # cond/uncond stay together
    finally:
        for c in clients:
            await c.close()


@pytest.mark.parametrize("batching", ["1", "0"])
async def test_lora_requests_never_pollute_base_outputs(
    models_dir, start_service, refs, loras, batching
) -> None:
    """Base outputs before and after other clients' LoRA steps are bitwise identical; during them too
    when each step runs alone (batching off), and within GEMM round-off when merged with LoRA rows."""
    settings = make_settings(models_dir, LUNA_UNET_BATCHING=batching, LUNA_UNET_MAX_DELAY_MS="50")
    service = start_service(build, settings)
    base_inputs = step_inputs(refs[SD15], batch=2, seed=200)
    base_request = (base_inputs, {"model": SD15})
    lora_requests = [r for r in _eight_requests(refs) if r[1]["lora"] and r[0]["x"].shape[-1] == 8]
    async with AsyncClient("unet", url=service.url, name="base") as base_client:
        before = await _alone(base_client, base_request)
        others = [AsyncClient("unet", url=service.url, name=f"lora-{i}") for i in range(len(lora_requests))]
        try:
            rounds = await asyncio.gather(
                *(base_client.call("step", *base_request) for _ in range(3)),
                *(c.call("step", *r) for c, r in zip(others, lora_requests, strict=True)),
            )
        finally:
            for c in others:
                await c.close()
        after = await _alone(base_client, base_request)
    assert torch.equal(after, before)
    merged_rows = [params["batch_rows"] for _, params in rounds[:3]]
    assert max(merged_rows) > 2 if batching == "1" else max(merged_rows) == 2
    for out, params in rounds[:3]:
        if batching == "0" or params["batch_rows"] == 2:
            assert torch.equal(out["out"], before)
        else:
            torch.testing.assert_close(out["out"], before, rtol=1e-5, atol=1e-5)


async def test_bad_input_is_4xx_and_the_service_stays_up(service, refs, loras) -> None:
    good = step_inputs(refs[SD15], batch=2, seed=300)
    xl = step_inputs(refs[SDXL], batch=2, seed=301)
    nan_x = good["x"].clone()
    nan_x[0, 0, 0, 0] = float("nan")
    bad = {
        "wrong latent channels": (good | {"x": torch.randn(2, 3, 8, 8)}, {"model": SD15}),
        "wrong context width": (good | {"context": torch.randn(2, 77, 31)}, {"model": SD15}),
        "mismatched batch": (good | {"timesteps": torch.rand(3)}, {"model": SD15}),
        "unknown model": (good, {"model": "nope.safetensors"}),
        "path escape": (good, {"model": "../../etc/passwd"}),
        "unknown lora": (good, {"model": SD15, "lora": [{"name": "missing.safetensors", "strength": 1}]}),
        "corrupt lora": (good, {"model": SD15, "lora": [{"name": "corrupt.safetensors", "strength": 1}]}),
        "lora for another model": (good, {"model": SD15, "lora": [{"name": "sdxl-kohya.safetensors"}]}),
        "nan": (good | {"x": nan_x}, {"model": SD15}),
        "batch over the limit": (step_inputs(refs[SD15], batch=17), {"model": SD15}),
        "sdxl without y": ({k: v for k, v in xl.items() if k != "y"}, {"model": SDXL}),
        "control of the wrong shape": (good | {"control.output.0": torch.randn(2, 5, 8, 8)}, {"model": SD15}),
        "strength not a number": (
            good,
            {"model": SD15, "lora": [{"name": "sd15-kohya.safetensors", "strength": "x"}]},
        ),
    }
    async with AsyncClient("unet", url=service.url) as client:
        for what, (tensors, params) in bad.items():
            with pytest.raises(LunaError) as info:
                await client.call("step", tensors, params)
            assert 400 <= info.value.status < 500, f"{what}: {info.value.status} {info.value}"
        out, _ = await client.call("step", good, {"model": SD15})
        assert torch.equal(out["out"], reference_step(refs[SD15], good))


async def test_models_are_listed_loaded_and_unloaded(models_dir, start_service) -> None:
    settings = make_settings(models_dir, LUNA_UNET_PRELOAD=SD15)
    service = start_service(build, settings)
    async with AsyncClient("unet", url=service.url) as client:
        listing = await client.get_json("/v1/unet/models")
        assert [m["name"] for m in listing["loaded"]] == [SD15]
        assert SDXL in listing["available"]
        _, described = await client.call("load", {}, {"model": SDXL})
        assert described["family"] == "sdxl" and described["bytes"] > 0
        # No host path in a reply: the names are relative to the model roots.
        status = await client.get_json("/v1/status")
        for reply in (listing, described, status, await client.get_json("/v1/unet/models")):
            assert str(models_dir) not in json.dumps(reply)
        status, reply = await client._request("DELETE", f"/v1/unet/models/{SDXL}")
        assert status == 200 and reply["unloaded"] is True
        _, reply = await client._request("POST", "/v1/unet/unload", json_body={"model": SD15})
        assert reply["unloaded"] is True
        assert (await client.get_json("/v1/unet/models"))["loaded"] == []
