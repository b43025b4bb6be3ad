"""The pack inside real ComfyUI, headless through its execution engine.

One full-size random-weight SD1.5 checkpoint runs the same API-format workflow twice: with ComfyUI's
own CheckpointLoaderSimple, and with the Shared Checkpoint Loader against running CLIP / VAE / UNet
services (by the same model name). Standard nodes (CLIPTextEncode, LoraLoader, KSampler, VAEDecode,
VAEEncode, ...) consume both; a second workflow does the same for SamplerCustom (KSamplerSelect +
BasicScheduler). The harness (ComfyUI, the services, the test nodes) is tests/comfyui_harness.py;
ControlNet / T2I-Adapters, zero-edit mode, names, messages and the pack installed into a ComfyUI checkout:
tests/test_comfy_dropin_comfyui.py.

Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements; see docs/comfyui.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from .comfyui_harness import (
    CKPT,
    LORA_RTOL,
    RTOL,
    ComfyRuntime,
    execute,
    rel,
    requires_comfyui,
    run,
    unload,
    write_family,
)

pytestmark = requires_comfyui
# SDXL at full size: ComfyUI's fp32 copy plus the services' in one process needs well over 24 GB RAM.
RUN_SDXL = os.environ.get("LUNA_COMFY_SDXL") == "1"


def workflow(family: str, shared: bool) -> dict[str, Any]:
    """API-format prompt: text encode, LoRA, sample, decode, re-encode; every result captured."""
    ckpt = f"{family}-full.safetensors"
    loader = (
        {"class_type": "LunaStackCheckpointLoader", "inputs": {"ckpt_name": ckpt}}  # ComfyUI's own name
        if shared
        else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
    )

    def sampler(model: str, positive: str) -> dict[str, Any]:
        inputs = {
            "model": [model, 0],
            "seed": 7,
            "steps": 2,
            "cfg": 5.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": [positive, 0],
            "negative": ["4", 0],
            "latent_image": ["6", 0],
            "denoise": 1.0,
        }
        return {"class_type": "KSampler", "inputs": inputs}

    def positive(clip: str) -> dict[str, Any]:
        text = "a (red:1.2) fox in snow"
        if family == "sd15":
            return {"class_type": "CLIPTextEncode", "inputs": {"clip": [clip, 1], "text": text}}
        sizes = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
        inputs = {"clip": [clip, 1], **sizes, "text_g": text, "text_l": "a fox"}
        return {"class_type": "CLIPTextEncodeSDXL", "inputs": inputs}

    def capture(kind: str, key: str, source: str) -> dict[str, Any]:
        return {"class_type": f"TestCapture{kind}", "inputs": {"key": key, "value": [source, 0]}}

    lora = {
        "model": ["1", 0],
        "clip": ["1", 1],
        "lora_name": f"{family}-lora.safetensors",
        "strength_model": 1.0,
        "strength_clip": 1.0,
    }
    model_lora = {"model": ["1", 0], "lora_name": lora["lora_name"]}
    # 64-pixel tiles on a 64x64 image: ComfyUI's three passes (64x64, 32x128, 128x32) really tile.
    tiles = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    advanced = {
        **{k: v for k, v in sampler("12", "3")["inputs"].items() if k not in ("seed", "denoise")},
        "add_noise": "enable",
        "noise_seed": 7,
        "start_at_step": 0,
        "end_at_step": 10000,
        "return_with_leftover_noise": "disable",
    }
    return {
        "1": loader,
        "2": {"class_type": "LoraLoader", "inputs": lora},
        "3": positive("1"),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "5": positive("2"),
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": sampler("1", "3"),
        "8": sampler("2", "5"),
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["1", 2]}},
        "12": {"class_type": "LoraLoaderModelOnly", "inputs": {**model_lora, "strength_model": 0.5}},
        "13": {"class_type": "KSamplerAdvanced", "inputs": advanced},
        "14": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["7", 0], "vae": ["1", 2], **tiles}},
        "15": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["9", 0], "vae": ["1", 2], **tiles}},
        "20": capture("CONDITIONING", "cond", "3"),
        "21": capture("CONDITIONING", "cond_lora", "5"),
        "22": capture("LATENT", "latent", "7"),
        "23": capture("LATENT", "latent_lora", "8"),
        "24": capture("IMAGE", "image", "9"),
        "25": capture("IMAGE", "image_lora", "10"),
        "26": capture("LATENT", "encoded", "11"),
        "27": capture("LATENT", "latent_model_lora", "13"),
        "28": capture("IMAGE", "image_tiled", "14"),
        "29": capture("LATENT", "encoded_tiled", "15"),
    }


@pytest.mark.parametrize(
    "family",
    ["sd15", pytest.param("sdxl", marks=pytest.mark.skipif(not RUN_SDXL, reason="set LUNA_COMFY_SDXL=1"))],
)
def test_standard_nodes_on_proxies_match_comfyui_local(comfy: ComfyRuntime, family: str) -> None:
    write_family(comfy.models, family)
    shared = run(comfy, workflow(family, shared=True))
    # Zero-edit mode: the local workflow, unchanged, runs on the shared models (the same services' results).
    os.environ["LUNA_ZERO_EDIT"] = "1"
    try:
        zero_edit = run(comfy, workflow(family, shared=False))
    finally:
        del os.environ["LUNA_ZERO_EDIT"]
    unload(f"checkpoints/{family}-full.safetensors")  # one copy of the weights in RAM at a time
    local = run(comfy, workflow(family, shared=False))

    def pick(out: dict[str, Any], key: str) -> torch.Tensor:
        value = out[key.removesuffix("_pooled")]
        if key.startswith("cond"):
            return value[0][1]["pooled_output"] if key.endswith("_pooled") else value[0][0]
        return value["samples"] if isinstance(value, dict) else value

    keys = ["cond", "cond_pooled", "latent", "image", "encoded", "cond_lora", "latent_lora", "image_lora"]
    keys += ["latent_model_lora", "image_tiled", "encoded_tiled"]
    agreement = {k: rel(pick(local, k), pick(shared, k)) for k in keys}
    lora_effect = {k: rel(pick(local, k), pick(local, f"{k}_lora")) for k in ("cond", "latent", "image")}
    lora_effect["model_only"] = rel(pick(local, "latent"), pick(local, "latent_model_lora"))
    print("max |local - shared| / max |local|:", agreement, "LoRA effect:", lora_effect)
    assert shared["image"].shape == local["image"].shape == (1, 64, 64, 3)
    for key, value in agreement.items():
        assert value < (LORA_RTOL if key.endswith("_lora") else RTOL), (key, agreement)
    assert rel(pick(local, "image"), pick(local, "image_tiled")) > 100 * RTOL  # tiling really happened
    for key in keys:  # zero-edit mode gave exactly the shared loader's results
        assert torch.equal(pick(zero_edit, key), pick(shared, key)), key
    # The LoRA really acts, far beyond the tolerance, on both sides alike.
    assert min(lora_effect.values()) > 5 * LORA_RTOL, lora_effect


def custom_sampler_workflow(shared: bool) -> dict[str, Any]:
    """API-format prompt: SamplerCustom with a SAMPLER from KSamplerSelect (an SDE sampler, so the seed also
    drives the noise between steps) and SIGMAS from BasicScheduler, at two seeds; both outputs captured."""
    loader = (
        {"class_type": "LunaStackCheckpointLoader", "inputs": {"ckpt_name": CKPT}}
        if shared
        else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}
    )

    def sample(seed: int) -> dict[str, Any]:
        inputs = {
            "model": ["1", 0],
            "add_noise": True,
            "noise_seed": seed,
            "cfg": 5.0,
            "positive": ["2", 0],
            "negative": ["3", 0],
            "sampler": ["5", 0],
            "sigmas": ["6", 0],
            "latent_image": ["4", 0],
        }
        return {"class_type": "SamplerCustom", "inputs": inputs}

    def capture(kind: str, key: str, source: str, index: int = 0) -> dict[str, Any]:
        return {"class_type": f"TestCapture{kind}", "inputs": {"key": key, "value": [source, index]}}

    def encode(text: str) -> dict[str, Any]:
        return {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}

    schedule = {"model": ["1", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}
    return {
        "1": loader,
        "2": encode("a (red:1.2) fox in snow"),
        "3": encode("blurry"),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m_sde"}},
        "6": {"class_type": "BasicScheduler", "inputs": schedule},
        "7": sample(7),
        "8": sample(8),
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "20": capture("SIGMAS", "sigmas", "6"),
        "21": capture("LATENT", "latent", "7"),
        "22": capture("LATENT", "denoised", "7", 1),
        "23": capture("LATENT", "latent_seed8", "8"),
        "24": capture("IMAGE", "image", "9"),
    }


@contextmanager
def _progress_events() -> Iterator[list[tuple[str, int, int, bool]]]:
    """What ComfyUI's progress bar hook receives (as main.py's hook does: the node from the executing
    context): (node id, value, total, whether a preview image came with it)."""
    import comfy.utils
    from comfy_execution.utils import get_executing_context

    events: list[tuple[str, int, int, bool]] = []

    def hook(value: int, total: int, preview: Any, prompt_id: Any = None, node_id: Any = None) -> None:
        context = get_executing_context()
        node = node_id or (context.node_id if context is not None else None)
        events.append((str(node), int(value), int(total), preview is not None))

    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield events
    finally:
        comfy.utils.set_progress_bar_global_hook(saved)


def test_sampler_custom_on_proxy_matches_comfyui_local(comfy: ComfyRuntime) -> None:
    previews = {"preview_method": "latent2rgb"}  # the sampler callback also renders previews from x0
    with _progress_events() as shared_progress:
        shared = run(comfy, custom_sampler_workflow(shared=True), previews)
    unload(f"checkpoints/{CKPT}")
    with _progress_events() as local_progress:
        local = run(comfy, custom_sampler_workflow(shared=False), previews)

    def pick(out: dict[str, Any], key: str) -> torch.Tensor:
        return out[key]["samples"] if isinstance(out[key], dict) else out[key]

    assert torch.equal(local["sigmas"], shared["sigmas"])  # ComfyUI's own model_sampling on both sides
    assert len(shared["sigmas"]) == 4 and shared["sigmas"][-1] == 0
    keys = ["latent", "denoised", "latent_seed8", "image"]
    agreement = {k: rel(pick(local, k), pick(shared, k)) for k in keys}
    seed_effect = {
        side: rel(pick(out, "latent"), pick(out, "latent_seed8"))
        for side, out in (("local", local), ("shared", shared))
    }
    print("SamplerCustom max |local - shared| / max |local|:", agreement, "seed 7 vs 8:", seed_effect)
    assert shared["latent"]["samples"].shape == local["latent"]["samples"].shape == (1, 4, 8, 8)
    assert shared["image"].shape == local["image"].shape == (1, 64, 64, 3)
    for key, value in agreement.items():
        assert value < RTOL, (key, agreement)
    # Another seed gives another result, far beyond the tolerance, on both sides alike.
    assert min(seed_effect.values()) > 100 * RTOL, seed_effect
    # The progress bar moves step by step for each SamplerCustom node, with previews, as for a local model.
    assert shared_progress == local_progress, (shared_progress, local_progress)
    for node in ("7", "8"):
        assert [e[1:] for e in shared_progress if e[0] == node] == [(1, 3, True), (2, 3, True), (3, 3, True)]


def test_sampler_custom_errors_on_proxy_are_readable(comfy: ComfyRuntime) -> None:
    """A patch that cannot run remotely (FreeU) fails the SamplerCustom node with RemotePatchError in
    ComfyUI's error message; an unreachable UNet service gives the pack's one-line LunaNodeError."""
    prompt = custom_sampler_workflow(shared=True)
    prompt["10"] = {
        "class_type": "FreeU_V2",
        "inputs": {"model": ["1", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    }
    for node in ("7", "8"):
        prompt[node]["inputs"]["model"] = ["10", 0]
    errors = execute(comfy, prompt)
    assert len(errors) == 1, errors
    error = errors[0][1]
    assert error["node_type"] == "SamplerCustom", error
    assert error["exception_type"] == "luna_stack.client.errors.LunaStackPatchError", error
    assert "cannot run on the shared Luna Stack UNet" in error["exception_message"], error
    assert "output_block_patch" in error["exception_message"], error

    from comfy import sample, samplers  # (the fixture is named comfy too)

    nodes = comfy.nodes
    # (an old prefixed name, as saved by earlier versions of the pack, still loads)
    model, clip, _vae = nodes.NODE_CLASS_MAPPINGS["LunaStackCheckpointLoader"]().load(f"checkpoints/{CKPT}")
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a fox")
    proxy = sys.modules[type(model.model.diffusion_model).__module__]  # the pack's model_proxy module
    remote = sys.modules[proxy.Services.__module__]
    dead = remote.PackSettings({"clip": None, "vae": None, "unet": "http://127.0.0.1:9"}, None, None)
    services = proxy.Services(dead)
    unreachable = proxy.remote_model(services, f"checkpoints/{CKPT}", {"family": "sd15"})
    sigmas = samplers.calculate_sigmas(unreachable.get_model_object("model_sampling"), "karras", 2)
    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(Exception, match=r"UNET service is not reachable at http://127\.0\.0\.1:9") as info:
        sample.sample_custom(
            unreachable,
            torch.randn(1, 4, 8, 8),
            5.0,
            samplers.sampler_object("euler"),
            sigmas,
            positive,
            positive,
            latent,
            seed=7,
        )
    services.close()
    assert type(info.value).__name__ == "LunaStackUnavailable"
    assert "LUNA_UNET_URL" in str(info.value)


def test_a_patch_that_cannot_run_remotely_fails_loudly(comfy: ComfyRuntime) -> None:
    nodes = comfy.nodes
    model, clip, _vae = nodes.NODE_CLASS_MAPPINGS["LunaStackCheckpointLoader"]().load(f"checkpoints/{CKPT}")
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a fox")
    patched = model.clone()
    patched.set_model_output_block_patch(lambda h, hsp, transformer_options: (h, hsp))  # e.g. FreeU's kind
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(Exception, match="cannot run on the shared Luna Stack UNet") as info:
        nodes.common_ksampler(patched, 1, 1, 1.0, "euler", "normal", positive, positive, latent)
    assert type(info.value).__name__ == "LunaStackPatchError"
    (out,) = nodes.common_ksampler(model, 1, 1, 1.0, "euler", "normal", positive, positive, latent)
    assert out["samples"].shape == (1, 4, 8, 8)  # the unpatched clone still samples
