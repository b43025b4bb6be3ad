"""The pack inside real ComfyUI, headless through its execution engine.

One full-size random-weight SD1.5 checkpoint runs the same API-format workflow twice: with ComfyUI's
own CheckpointLoaderSimple, and with the Shared Checkpoint Loader against running CLIP / VAE / UNet
services. Standard nodes (CLIPTextEncode, LoraLoader, KSampler, VAEDecode, VAEEncode, ...) consume both;
a second workflow does the same for SamplerCustom (KSamplerSelect + BasicScheduler).

Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements; see docs/comfyui.md.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from luna_stack.devtools.embedded import EmbeddedService
from luna_stack.devtools.fixtures import clip_config, unet_config, write_checkpoint
from luna_stack.devtools.lora_fixtures import write_lora

from .conftest import make_settings

# The services (diffusers, transformers) are imported after ComfyUI: in ComfyUI's environment
# transformers imports torchvision, which needs _import_torchvision() first.

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set (a ComfyUI checkout)")

ROOT = Path(__file__).resolve().parents[1]
CKPT = "sd15-full.safetensors"
# SDXL at full size: ComfyUI's fp32 copy plus the services' in one process needs well over 24 GB RAM.
RUN_SDXL = os.environ.get("LUNA_COMFY_SDXL") == "1"
# Agreement, as max |local - shared| / max |local| (fp32 on CPU, 64x64, 2 euler steps at cfg 5). Measured
# for SD1.5 (SDXL alike, on a lighter version of this workflow): <= 6.1e-6 without LoRA (ComfyUI's own
# UNet / CLIP / VAE modules vs the services' diffusers / transformers ones: float rounding only); <= 2.4e-4
# with the LoRA (ComfyUI merges W + dW, the services add B(A x) beside W). The LoRA itself moves the
# outputs by 1.6 % (model only, strength 0.5) to 23 %.
RTOL = 5e-5
LORA_RTOL = 1e-3
# torchvision's PyPI wheel registers fake kernels for C++ ops that a CPU-only torch build lacks.
_TORCHVISION_OPS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
]
_keep_alive: list[Any] = []


class _NoTorchvision(types.ModuleType):
    """Stand-in for torchvision while ComfyUI imports: any use raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name}: torchvision is not installed (a stand-in for the test)")


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """ComfyUI imports torchvision at module level for models this test never builds (Stable Cascade's
    EfficientNet, Cosmos, ACE, WanMove); without torchvision installed, stand-in modules satisfy those
    imports while ComfyUI is imported and are removed afterwards. transformers and diffusers record that
    torchvision is absent before the stand-ins exist (both cache the answer)."""
    import diffusers.utils
    import transformers.utils

    assert not transformers.utils.is_torchvision_available()
    assert not diffusers.utils.is_torchvision_available()
    names = ["torchvision", "torchvision.models", "torchvision.transforms"]
    names.append("torchvision.transforms.functional")
    stand_ins = {name: _NoTorchvision(name) for name in names}
    for name, module in stand_ins.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_ins[parent], child, module)
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]


def _import_torchvision() -> bool:
    """True when torchvision is installed (and importable); False when it is not."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OPS:
            lib.define(schema)
        _keep_alive.append(lib)
        importlib.import_module("torchvision")
    return True


def _import_comfyui(path: str) -> Any:
    """ComfyUI headless on the CPU: --cpu parsed before comfy.cli_args is imported."""
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        with nullcontext() if _import_torchvision() else _torchvision_stand_in():
            import comfy.options

            comfy.options.enable_args_parsing()
            argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
            try:
                import comfy.cli_args
            finally:
                sys.argv = argv
            import comfy.sd
            import comfy.supported_models
            import execution
            import folder_paths
            import nodes
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {path} does not import here ({exc}); use a Python with its requirements")
    return execution, folder_paths, nodes


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


class _Server:
    """What PromptExecutor needs of ComfyUI's PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        return None

    def queue_updated(self) -> None:
        return None


# -- fixtures -----------------------------------------------------------------------------------------------
def _write_family(root: Path, family: str) -> None:
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


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    assert COMFYUI_PATH is not None
    execution, folder_paths, nodes = _import_comfyui(COMFYUI_PATH)
    models = tmp_path_factory.mktemp("comfy-models")
    for folder in ("checkpoints", "vae", "clip", "unet", "loras", "embeddings"):
        (models / folder).mkdir()
    _write_family(models, "sd15")
    from luna_stack.clip.family import build as build_clip
    from luna_stack.unet.family import build as build_unet
    from luna_stack.vae.family import build as build_vae

    settings = make_settings(models)
    running = [EmbeddedService(build(settings)).start() for build in (build_clip, build_vae, build_unet)]
    env = {f"LUNA_{kind}_URL": svc.url for kind, svc in zip(("CLIP", "VAE", "UNET"), running, strict=True)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for svc in running:
            svc.wait_ready()
        folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
        folder_paths.add_model_folder_path("loras", str(models / "loras"))
        # CLIPTextEncodeSDXL; SamplerCustom, KSamplerSelect, BasicScheduler; FreeU (a local UNet patch)
        for extra in ("nodes_clip_sdxl.py", "nodes_custom_sampler.py", "nodes_freelunch.py"):
            path = os.path.join(COMFYUI_PATH, "comfy_extras", extra)
            assert asyncio.run(nodes.load_custom_node(path, module_parent="comfy_extras"))
        assert asyncio.run(nodes.load_custom_node(str(ROOT / "comfy_nodes")))
        for kind in ("IMAGE", "LATENT", "CONDITIONING", "SIGMAS"):
            nodes.NODE_CLASS_MAPPINGS[f"TestCapture{kind}"] = _capture_node(kind)
        yield execution, nodes, models
    finally:
        for svc in running:
            svc.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def execute(
    runtime: tuple[Any, Any, Path], prompt: dict[str, Any], extra_data: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Validate and run a prompt as ComfyUI's queue does; the execution_error messages (none: success)."""
    from comfy import model_management

    execution, _nodes, _models = runtime
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert ok, (error, node_errors)
    CAPTURED.clear()
    executor = execution.PromptExecutor(
        _Server(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
    )
    executor.execute(prompt, "test", extra_data or {}, outputs)
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success == (not errors), executor.status_messages
    del executor
    model_management.unload_all_models()  # free ComfyUI's copy before the services load theirs
    gc.collect()
    return errors


def run(
    runtime: tuple[Any, Any, Path], prompt: dict[str, Any], extra_data: dict[str, Any] | None = None
) -> dict[str, Any]:
    errors = execute(runtime, prompt, extra_data)
    assert not errors, errors
    return dict(CAPTURED)


def _unload(model: str) -> None:
    """The UNet and VAE services drop a model (the RAM goes to ComfyUI's own copy next)."""
    for kind in ("UNET", "VAE"):
        url = f"{os.environ[f'LUNA_{kind}_URL']}/v1/{kind.lower()}/unload"
        request = urllib.request.Request(url, json.dumps({"model": model}).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        assert json.load(urllib.request.urlopen(request, timeout=60))["unloaded"] is True


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a|."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


@pytest.mark.parametrize(
    "family",
    ["sd15", pytest.param("sdxl", marks=pytest.mark.skipif(not RUN_SDXL, reason="set LUNA_COMFY_SDXL=1"))],
)
def test_standard_nodes_on_proxies_match_comfyui_local(comfy, family: str) -> None:
    _write_family(comfy[2], family)
    shared = run(comfy, workflow(family, shared=True))
    _unload(f"checkpoints/{family}-full.safetensors")  # one copy of the weights in RAM at a time
    local = run(comfy, workflow(family, shared=False))

    def pick(out: dict[str, Any], key: str) -> torch.Tensor:
        value = out[key.removesuffix("_pooled")]
        if key.startswith("cond"):
            return value[0][1]["pooled_output"] if key.endswith("_pooled") else value[0][0]
        return value["samples"] if isinstance(value, dict) else value

    keys = ["cond", "cond_pooled", "latent", "image", "encoded", "cond_lora", "latent_lora", "image_lora"]
    keys += ["latent_model_lora", "image_tiled", "encoded_tiled"]
    rel = {k: _rel(pick(local, k), pick(shared, k)) for k in keys}
    lora_effect = {k: _rel(pick(local, k), pick(local, f"{k}_lora")) for k in ("cond", "latent", "image")}
    lora_effect["model_only"] = _rel(pick(local, "latent"), pick(local, "latent_model_lora"))
    print("max |local - shared| / max |local|:", rel, "LoRA effect:", lora_effect)
    assert shared["image"].shape == local["image"].shape == (1, 64, 64, 3)
    for key, value in rel.items():
        assert value < (LORA_RTOL if key.endswith("_lora") else RTOL), (key, rel)
    assert _rel(pick(local, "image"), pick(local, "image_tiled")) > 100 * RTOL  # tiling really happened
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


def test_sampler_custom_on_proxy_matches_comfyui_local(comfy) -> None:
    previews = {"preview_method": "latent2rgb"}  # the sampler callback also renders previews from x0
    with _progress_events() as shared_progress:
        shared = run(comfy, custom_sampler_workflow(shared=True), previews)
    _unload(f"checkpoints/{CKPT}")
    with _progress_events() as local_progress:
        local = run(comfy, custom_sampler_workflow(shared=False), previews)

    def pick(out: dict[str, Any], key: str) -> torch.Tensor:
        return out[key]["samples"] if isinstance(out[key], dict) else out[key]

    assert torch.equal(local["sigmas"], shared["sigmas"])  # ComfyUI's own model_sampling on both sides
    assert len(shared["sigmas"]) == 4 and shared["sigmas"][-1] == 0
    keys = ["latent", "denoised", "latent_seed8", "image"]
    rel = {k: _rel(pick(local, k), pick(shared, k)) for k in keys}
    seed_effect = {
        side: _rel(pick(out, "latent"), pick(out, "latent_seed8"))
        for side, out in (("local", local), ("shared", shared))
    }
    print("SamplerCustom max |local - shared| / max |local|:", rel, "seed 7 vs 8:", seed_effect)
    assert shared["latent"]["samples"].shape == local["latent"]["samples"].shape == (1, 4, 8, 8)
    assert shared["image"].shape == local["image"].shape == (1, 64, 64, 3)
    for key, value in rel.items():
        assert value < RTOL, (key, rel)
    # Another seed gives another result, far beyond the tolerance, on both sides alike.
    assert min(seed_effect.values()) > 100 * RTOL, seed_effect
    # The progress bar moves step by step for each SamplerCustom node, with previews, as for a local model.
    assert shared_progress == local_progress, (shared_progress, local_progress)
    for node in ("7", "8"):
        assert [e[1:] for e in shared_progress if e[0] == node] == [(1, 3, True), (2, 3, True), (3, 3, True)]


def test_sampler_custom_errors_on_proxy_are_readable(comfy) -> None:
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

    _execution, nodes, _models = comfy
    # (an old prefixed name, as saved by earlier versions of the pack, still loads)
    model, clip, _vae = nodes.NODE_CLASS_MAPPINGS["LunaStackCheckpointLoader"]().load(f"checkpoints/{CKPT}")
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a fox")
    proxy = sys.modules[type(model.model.diffusion_model).__module__]  # the pack's model_proxy module
    remote = sys.modules[proxy.Services.__module__]
    dead = remote.PackSettings({"clip": None, "vae": None, "unet": "http://127.0.0.1:9"}, None, None)
    unreachable = proxy.remote_model(services := proxy.Services(dead), f"checkpoints/{CKPT}", "sd15")
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


def test_a_patch_that_cannot_run_remotely_fails_loudly(comfy) -> None:
    _execution, nodes, _models = comfy
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


def test_example_workflow_validates_in_comfyui(comfy) -> None:
    execution, nodes, _models = comfy
    for path in (ROOT / "examples").glob("*.json"):
        prompt = json.loads(path.read_text())
        missing = {n["class_type"] for n in prompt.values()} - set(nodes.NODE_CLASS_MAPPINGS)
        assert not missing, (path.name, missing)
    for name, output in (("sd15_shared_txt2img.json", "7"), ("sd15_shared_samplercustom.json", "9")):
        prompt = json.loads((ROOT / "examples" / name).read_text())
        prompt["1"]["inputs"]["ckpt_name"] = f"checkpoints/{CKPT}"
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("example", prompt, None))
        assert ok and outputs == [output], (name, error, node_errors)
