"""A Flux.1-dev sampling workflow of ComfyUI's standard nodes, run in real ComfyUI twice: on ComfyUI's own
UNETLoader (comfy.sd.load_diffusion_model -> comfy.ldm.flux) and on the pack's Shared UNet Loader (the
MODEL proxy stepping on the unet service) — ModelSamplingFlux, FluxGuidance, ConditioningZeroOut,
EmptySD3LatentImage and KSampler are ComfyUI's on both sides, so the final LATENT must agree.

ComfyUI's loader takes only Flux.1's widths (hidden 3072, 24 heads, T5 4096, CLIP pooled 768) but counts
the blocks from the keys: the file is Flux.1-dev at full width with 1 double and 1 single block (about
0.6 B parameters, 2.2 GB in fp32). No text encoder: a seeded test node gives both runs the same
CONDITIONING. The session harness is tests/comfyui_harness.py.

Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements; see docs/comfyui.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from luna_stack.devtools.fixtures_flux import flux_shallow, write_flux

from .comfyui_harness import ComfyRuntime, _seeded_node, rel, requires_comfyui, run, unload

pytestmark = requires_comfyui
FILE = "flux-dev-shallow.safetensors"
SIZE = 64  # pixels: an 8x8 latent, 16 image tokens beside the 256 text tokens
# max |shared - local| / max |local| of the final latent, fp32 on the CPU: ComfyUI's Flux vs diffusers'
# FluxTransformer2DModel in the service, 3 euler steps; measured 1.7e-7 (float rounding only), while
# guidance 1.0 instead of 3.5 moves it by 5.5e-2. The test takes about 70 s and 4.8 GB peak RSS.
RTOL = 1e-5


def _flux_conditioning(generator: torch.Generator) -> list:
    """CONDITIONING as CLIPTextEncodeFlux makes it: T5-XXL context [1, 256, 4096], CLIP-L pooled [1, 768]."""
    context = torch.randn(1, 256, 4096, generator=generator)
    return [[context, {"pooled_output": torch.randn(1, 768, generator=generator)}]]


@pytest.fixture
def flux_file(comfy: ComfyRuntime, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The shallow full-width Flux.1-dev file in the shared models folder, and the conditioning node."""
    monkeypatch.setitem(
        comfy.nodes.NODE_CLASS_MAPPINGS,
        "TestFluxConditioning",
        _seeded_node("CONDITIONING", _flux_conditioning),
    )
    path = write_flux(
        comfy.models / "unet" / FILE, "dev", "full", seed=3, dtype=torch.float32, config=flux_shallow()
    )
    try:
        yield FILE
    finally:
        path.unlink()


def workflow(loader: dict[str, Any], guidance: float = 3.5, seed: int = 11) -> dict[str, Any]:
    """API-format prompt: Flux-dev's example graph without its text encoders, final latent captured."""
    sampler = {
        "model": ["2", 0],
        "seed": seed,
        "steps": 3,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "positive": ["4", 0],
        "negative": ["5", 0],
        "latent_image": ["6", 0],
        "denoise": 1.0,
    }
    shift = {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": SIZE, "height": SIZE}
    return {
        "1": loader,
        "2": {"class_type": "ModelSamplingFlux", "inputs": shift},
        "3": {"class_type": "TestFluxConditioning", "inputs": {"seed": 5}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": guidance}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "6": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1},
        },
        "7": {"class_type": "KSampler", "inputs": sampler},
        "8": {"class_type": "TestCaptureLATENT", "inputs": {"key": "latent", "value": ["7", 0]}},
    }


def test_flux_dev_workflow_on_shared_unet_matches_comfyuis_own(comfy: ComfyRuntime, flux_file: str) -> None:
    local_loader = {"class_type": "UNETLoader", "inputs": {"unet_name": flux_file, "weight_dtype": "default"}}
    shared_loader = {"class_type": "LunaStackUNetLoader", "inputs": {"unet_name": flux_file}}
    # ComfyUI's copy first: execute() unloads it before the service loads its own (one copy in RAM).
    local = run(comfy, workflow(local_loader))["latent"]["samples"]
    try:
        shared = run(comfy, workflow(shared_loader))["latent"]["samples"]
        other_guidance = run(comfy, workflow(shared_loader, guidance=1.0))["latent"]["samples"]
    finally:
        unload(f"unet/{flux_file}", ("UNET",))
    assert local.shape == shared.shape == (1, 16, SIZE // 8, SIZE // 8)
    error = rel(local, shared)
    moved = rel(shared, other_guidance)  # the guidance reaches the output only through the model
    print(f"\nFlux-dev workflow, shared vs ComfyUI's own: max relative error {error:.2e}")
    print(f"guidance 1.0 instead of 3.5 moves the shared latent by {moved:.2e}")
    assert error < RTOL and moved > 1e-2
