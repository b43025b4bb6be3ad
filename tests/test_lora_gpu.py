"""The LoRA side path on a CUDA device: no host sync in a forward; capturable in a CUDA graph (issue 8)."""

from __future__ import annotations

import pytest
import torch

from luna_stack.devtools.lora_fixtures import tiny_unet, write_lora
from luna_stack.lora import LoraCache, attach_side_paths, row_groups

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def setup(tmp_path):
    unet = tiny_unet(sdxl=True).to("cuda", torch.float16)
    slots = attach_side_paths(unet)
    cache = LoraCache(1 << 30, "cuda", torch.float16)
    paths = [tmp_path / f"{n}.safetensors" for n in "ab"]
    write_lora(paths[0], unet, "unet", fmt="kohya", targets="all", unet_ldm_names=True, seed=1)
    write_lora(paths[1], unet, "unet", fmt="peft", targets="attn", seed=2)
    a, b = (cache.resolve(p, unet, "unet") for p in paths)
    plan = row_groups([(2, [(a, 0.8)]), (2, []), (2, [(a, 0.5), (b, -1.0)])])
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = {
        "sample": torch.randn(6, 4, 8, 8, device="cuda", dtype=torch.float16, generator=g),
        "timestep": torch.linspace(50, 900, 6, device="cuda"),
        "encoder_hidden_states": torch.randn(6, 7, 32, device="cuda", dtype=torch.float16, generator=g),
        "class_labels": torch.randn(6, 48, device="cuda", dtype=torch.float16, generator=g),
    }
    return unet, slots, plan, inputs


@torch.inference_mode()
def test_lora_forward_has_no_host_sync(setup):
    unet, slots, plan, inputs = setup
    with slots.plan(plan):
        unet(**inputs)  # warm-up: lazy initialisations may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = unet(**inputs).sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
    base = unet(**inputs).sample
    assert torch.equal(out[2:4], base[2:4])
    assert (out[:2] - base[:2]).abs().max() > 1e-2


@torch.inference_mode()
def test_lora_forward_replays_in_a_cuda_graph(setup):
    unet, slots, plan, inputs = setup
    with slots.plan(plan):
        eager = unet(**inputs).sample.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                unet(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = unet(**inputs).sample
    graph.replay()
    torch.testing.assert_close(static_out, eager, atol=1e-3, rtol=1e-3)

    # New values in the static inputs: the replay follows them, adapters included.
    inputs["sample"].copy_(torch.randn_like(inputs["sample"]))
    graph.replay()
    with slots.plan(plan):
        expected = unet(**inputs).sample
    torch.testing.assert_close(static_out, expected, atol=1e-3, rtol=1e-3)
