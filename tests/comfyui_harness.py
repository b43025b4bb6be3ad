"""What the tests against real ComfyUI share: ComfyUI imported headless on the CPU (with torchvision's
gaps covered), test-only nodes that hand tensors back, the services running beside it and the pack
loaded into it, and running a prompt as ComfyUI's queue does.

The `comfy` fixture is session-wide (registered in conftest.py): ComfyUI and the pack can be imported into
a process once, and the services keep their models between the modules that use it.
Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements; see docs/comfyui.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from luna_stack.devtools.embedded import EmbeddedService
from luna_stack.devtools.fixtures import clip_config, unet_config, write_checkpoint
from luna_stack.devtools.lora_fixtures import write_lora

from .comfyui_import import PromptServerStub, import_comfyui

# The services (diffusers, transformers) are imported after ComfyUI: in ComfyUI's environment
# transformers imports torchvision, which needs _import_torchvision() first.

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
requires_comfyui = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set (a ComfyUI checkout)")

ROOT = Path(__file__).resolve().parents[1]
CKPT = "sd15-full.safetensors"
# Agreement, as max |local - shared| / max |local| (fp32 on CPU, 64x64, 2 euler steps at cfg 5). Measured
# for SD1.5 (SDXL alike, on a lighter version of this workflow): <= 6.1e-6 without LoRA (ComfyUI's own
# UNet / CLIP / VAE modules vs the services' diffusers / transformers ones: float rounding only); <= 2.4e-4
# with the LoRA (ComfyUI merges W + dW, the services add B(A x) beside W). The LoRA itself moves the
# outputs by 1.6 % (model only, strength 0.5) to 23 %.
RTOL = 5e-5
LORA_RTOL = 1e-3
SERVED_SUFFIXES = (".safetensors", ".sft")  # of what ComfyUI's loaders list, what the services read
# The folders ComfyUI and the services share (one models folder, as the docs recommend).
SHARED_FOLDERS = {
    "checkpoints": "checkpoints",
    "loras": "loras",
    "vae": "vae",
    "diffusion_models": "unet",
    "text_encoders": "clip",
    "controlnet": "controlnet",
}

# -- test-only output nodes that hand the tensors back ---------------------------------------------------
CAPTURED: dict[str, Any] = {}


def _capture_node(kind: str) -> type:
    class Capture:
        CATEGORY = "testing"
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"key": ("STRING", {"default": ""}), "value": (kind,)}}

        def run(self, key: str, value: Any) -> tuple:
            CAPTURED[key] = value
            return ()

    return Capture


def write_family(root: Path, family: str) -> None:
    """checkpoints/<family>-full.safetensors (random weights, fp16 like real files) and a kohya LoRA
    loras/<family>-lora.safetensors touching the UNet and every text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (root / "checkpoints" / f"{family}-full.safetensors").exists():
        return
    write_checkpoint(root / "checkpoints" / f"{family}-full.safetensors", family, "full", 0, torch.float16)
    parts = root / "loras" / f"{family}-parts"
    parts.mkdir()
    with torch.device("meta"):  # the LoRA needs module names and shapes only
        unet = UNet2DConditionModel(**unet_config(family, "full"))
        clip_l = CLIPTextModel(CLIPTextConfig(**clip_config("l", "full")))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config("g", "full")))
    sdxl = family == "sdxl"
    write_lora(parts / "unet.safetensors", unet, "unet", "kohya", rank=8, seed=5, unet_ldm_names=sdxl)
    write_lora(
        parts / "l.safetensors", clip_l, "clip_l", "kohya", rank=8, seed=6, kohya_te="te1" if sdxl else "te"
    )
    files = ["unet", "l"]
    if sdxl:
        write_lora(parts / "g.safetensors", clip_g, "clip_g", "kohya", rank=8, seed=7)
        files.append("g")
    merged = {k: v for name in files for k, v in load_file(parts / f"{name}.safetensors").items()}
    save_file(merged, str(root / "loras" / f"{family}-lora.safetensors"))


class ComfyRuntime(NamedTuple):
    execution: Any  # ComfyUI's execution module
    nodes: Any  # ComfyUI's nodes module
    models: Path  # the models folder ComfyUI and the services share
    comfy_only: Path  # a models folder only ComfyUI sees
    urls: dict[str, str]  # the services


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyRuntime]:
    assert COMFYUI_PATH is not None
    execution, folder_paths, nodes = import_comfyui(COMFYUI_PATH)
    models = tmp_path_factory.mktemp("comfy-models")
    comfy_only = tmp_path_factory.mktemp("comfy-only")
    for folder in ("checkpoints", "vae", "clip", "unet", "loras", "embeddings", "controlnet"):
        (models / folder).mkdir()
    for folder in ("checkpoints", "loras"):
        (comfy_only / folder).mkdir()
    write_family(models, "sd15")
    from luna_stack.clip.family import build as build_clip
    from luna_stack.unet.family import build as build_unet
    from luna_stack.vae.family import build as build_vae

    from .conftest import make_settings

    settings = make_settings(models)
    running = [EmbeddedService(build(settings)).start() for build in (build_clip, build_vae, build_unet)]
    urls = {kind: svc.url for kind, svc in zip(("clip", "vae", "unet"), running, strict=True)}
    env = {f"LUNA_{kind.upper()}_URL": url for kind, url in urls.items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for svc in running:
            svc.wait_ready()
        for comfy_folder, folder in SHARED_FOLDERS.items():
            folder_paths.add_model_folder_path(comfy_folder, str(models / folder))
        for folder in ("checkpoints", "loras"):
            folder_paths.add_model_folder_path(folder, str(comfy_only / folder))
        # CLIPTextEncodeSDXL; SamplerCustom, KSamplerSelect, BasicScheduler; FreeU (a local UNet patch);
        # the Flux / SD3 examples' CLIPTextEncodeFlux, FluxGuidance, EmptySD3LatentImage, ModelSampling*
        extras = ("nodes_clip_sdxl.py", "nodes_custom_sampler.py", "nodes_freelunch.py", "nodes_flux.py")
        for extra in (*extras, "nodes_sd3.py", "nodes_model_advanced.py"):
            path = os.path.join(COMFYUI_PATH, "comfy_extras", extra)
            assert asyncio.run(nodes.load_custom_node(path, module_parent="comfy_extras"))
        assert asyncio.run(nodes.load_custom_node(str(ROOT / "comfy_nodes")))
        for kind in ("IMAGE", "LATENT", "CONDITIONING", "SIGMAS"):
            nodes.NODE_CLASS_MAPPINGS[f"TestCapture{kind}"] = _capture_node(kind)
        nodes.NODE_CLASS_MAPPINGS["TestSDXLConditioning"] = _seeded_node("CONDITIONING", _sdxl_conditioning)
        nodes.NODE_CLASS_MAPPINGS["TestImage"] = _seeded_node(
            "IMAGE", lambda g: torch.rand(1, 64, 64, 3, generator=g)
        )
        yield ComfyRuntime(execution, nodes, models, comfy_only, urls)
    finally:
        for svc in running:
            svc.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pack_module(name: str) -> Any:
    """A module of the pack as ComfyUI loaded it (ComfyUI names a pack by its path, dots replaced)."""
    return sys.modules[str(ROOT / "comfy_nodes").replace(".", "_x_") + "." + name]


def execute(
    runtime: ComfyRuntime, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Validate and run a prompt as ComfyUI's queue does; the execution_error messages (none: success)."""
    from comfy import model_management

    execution = runtime.execution
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert ok, (error, node_errors)
    CAPTURED.clear()
    executor = execution.PromptExecutor(
        PromptServerStub(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
    )
    executor.execute(prompt, "test", extra_data or {}, outputs)
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success == (not errors), executor.status_messages
    del executor
    model_management.unload_all_models()  # free ComfyUI's copy before the services load theirs
    gc.collect()
    return errors


def run(
    runtime: ComfyRuntime, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None
) -> dict[str, Any]:
    errors = execute(runtime, prompt, extra_data)
    assert not errors, errors
    return dict(CAPTURED)


def unload(model: str, kinds: tuple[str, ...] = ("UNET", "VAE")) -> None:
    """The services drop a model (the RAM goes to ComfyUI's own copy next)."""
    for kind in kinds:
        url = f"{os.environ[f'LUNA_{kind}_URL']}/v1/{kind.lower()}/unload"
        request = urllib.request.Request(url, json.dumps({"model": model}).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        assert json.load(urllib.request.urlopen(request, timeout=60))["unloaded"] is True


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a|."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


def _seeded_node(kind: str, make: Any) -> type:
    """A test node giving a seeded random `kind` (the same tensor on both sides of a comparison)."""

    class Seeded:
        CATEGORY = "testing"
        RETURN_TYPES = (kind,)
        FUNCTION = "make"

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1 << 31})}}

        def make(self, seed: int) -> tuple:
            return (make(torch.Generator().manual_seed(seed)),)

    return Seeded


def _sdxl_conditioning(generator: torch.Generator) -> list:
    """CONDITIONING as CLIPTextEncodeSDXL makes it (no CLIP-G needed to test the UNet side)."""
    cond = torch.randn(1, 77, 2048, generator=generator)
    sizes = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
    return [[cond, {"pooled_output": torch.randn(1, 1280, generator=generator), **sizes}]]


def install_as_pack(custom_nodes: Path) -> Path:
    """What `git clone <repo> custom_nodes/luna-stack` gives: the repository's files (the working tree's
    tracked and untracked-but-not-ignored files, so an uncommitted change is tested too)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    target = custom_nodes / "luna-stack"
    for rel in filter(None, (f.decode() for f in files)):
        if (ROOT / rel).is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target / rel)
    return target
