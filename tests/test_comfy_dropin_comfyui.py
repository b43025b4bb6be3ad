"""The pack as a ComfyUI user meets it, inside real ComfyUI: the shared loaders list exactly what ComfyUI's
own loaders list, the examples validate unchanged, the stack-down / missing-model / missing-LoRA messages as
ComfyUI reports them, zero-edit mode (ComfyUI's own loaders on shared models, and their fallback),
ControlNet and T2I-Adapters on a shared MODEL against ComfyUI's local result (SD1.5 and SDXL), and the
repository installed into a ComfyUI checkout the way a user installs a pack.

The harness is tests/comfyui_harness.py (the `comfy` fixture). Needs COMFYUI_PATH; see docs/comfyui.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from luna_stack.devtools.fixtures import (
    SDXL_LITE_DEPTH,
    write_clip,
    write_controlnet,
    write_t2i_adapter,
    write_unet,
    write_vae,
)

from .comfyui_harness import (
    CKPT,
    COMFYUI_PATH,
    ROOT,
    RTOL,
    SERVED_SUFFIXES,
    ComfyRuntime,
    execute,
    install_as_pack,
    pack_module,
    rel,
    requires_comfyui,
    run,
    unload,
)

pytestmark = requires_comfyui
LITE_UNET = "sdxl-lite-unet.safetensors"  # SDXL's widths and conditioning, fewer transformer layers
SMALL = {  # small random models the services load in a moment (ComfyUI cannot load these widths itself)
    "unet/sd15-small-unet.safetensors": lambda p: write_unet(p, "sd15", "small"),
    "clip/clip_l.safetensors": lambda p: write_clip(p, "l", "small"),
    "clip/clip_g.safetensors": lambda p: write_clip(p, "g", "small", layout="openclip"),
    "vae/sd15-small-vae.safetensors": lambda p: write_vae(p, "sd15", "small"),
    "vae/sd15-full-vae.safetensors": lambda p: write_vae(p, "sd15", "full"),  # ComfyUI loads this one
}


@pytest.fixture(scope="module")
def dropin(comfy: ComfyRuntime) -> ComfyRuntime:
    """The shared models folder with a few more files, and ComfyUI-only copies of a checkpoint and a LoRA."""
    for name, write in SMALL.items():
        if not (comfy.models / name).exists():
            write(comfy.models / name)
    only_comfyui = {
        "checkpoints/local-only.safetensors": f"checkpoints/{CKPT}",
        "loras/comfy-only-lora.safetensors": "loras/sd15-lora.safetensors",
    }
    for name, source in only_comfyui.items():
        if not (comfy.comfy_only / name).exists():
            os.link(comfy.models / source, comfy.comfy_only / name)
    return comfy


@contextmanager
def zero_edit(value: str | None) -> Iterator[None]:
    saved = os.environ.pop("LUNA_ZERO_EDIT", None)
    if value is not None:
        os.environ["LUNA_ZERO_EDIT"] = value
    try:
        yield
    finally:
        os.environ.pop("LUNA_ZERO_EDIT", None)
        if saved is not None:
            os.environ["LUNA_ZERO_EDIT"] = saved


@contextmanager
def pack_log() -> Iterator[list[str]]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("luna_stack.comfy")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _input_list(nodes: Any, node: str, key: str) -> list[str]:
    return nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"][key][0]


# -- names ----------------------------------------------------------------------------------------------
def test_shared_loaders_list_exactly_what_comfyuis_loaders_list(dropin: ComfyRuntime) -> None:
    pairs = [
        (("LunaStackCheckpointLoader", "ckpt_name"), ("CheckpointLoaderSimple", "ckpt_name")),
        (("LunaStackUNetLoader", "unet_name"), ("UNETLoader", "unet_name")),
        (("LunaStackCLIPLoader", "clip_name1"), ("CLIPLoader", "clip_name")),
        (("LunaStackCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name1")),
        (("LunaStackVAELoader", "vae_name"), ("VAELoader", "vae_name")),
    ]
    comfy_only = {p.name for p in dropin.comfy_only.rglob("*.safetensors")}
    for shared, own in pairs:
        theirs = _input_list(dropin.nodes, *own)
        # ComfyUI also lists formats the services never read (.ckpt, TAESD, pixel_space) and the files
        # only it can see; everything else is the same list, in the same order.
        expected = [n for n in theirs if n.lower().endswith(SERVED_SUFFIXES) and n not in comfy_only]
        assert _input_list(dropin.nodes, *shared) == expected, shared
        assert expected, own
    assert "local-only.safetensors" in _input_list(dropin.nodes, "CheckpointLoaderSimple", "ckpt_name")


def test_examples_validate_in_comfyui_without_edits(dropin: ComfyRuntime) -> None:
    """Once the files the examples name exist (here: links to the fixtures), every example validates."""
    named = {
        "checkpoints/v1-5-pruned-emaonly.safetensors": "checkpoints/" + CKPT,
        "checkpoints/sd_xl_base_1.0.safetensors": "checkpoints/" + CKPT,
        "unet/sd_xl_base_1.0_unet.safetensors": "unet/sd15-small-unet.safetensors",
        "vae/sdxl_vae.safetensors": "vae/sd15-small-vae.safetensors",
        "loras/my_style.safetensors": "loras/sd15-lora.safetensors",
        # Flux / SD3 examples: validation asks only that the services list the files
        "unet/flux1-dev.safetensors": "unet/sd15-small-unet.safetensors",
        "unet/flux1-schnell.safetensors": "unet/sd15-small-unet.safetensors",
        "unet/sd3.5_large.safetensors": "unet/sd15-small-unet.safetensors",
        "clip/clip_l.safetensors": "checkpoints/" + CKPT,
        "clip/clip_g.safetensors": "checkpoints/" + CKPT,
        "clip/t5xxl_fp16.safetensors": "checkpoints/" + CKPT,
        "clip/t5xxl_fp8_e4m3fn.safetensors": "checkpoints/" + CKPT,
        "vae/ae.safetensors": "vae/sd15-small-vae.safetensors",
        "vae/sd3.5_vae.safetensors": "vae/sd15-small-vae.safetensors",
    }
    for name, source in named.items():
        if not (dropin.models / name).exists():
            os.link(dropin.models / source, dropin.models / name)
    examples = sorted((ROOT / "examples").glob("*.json"))
    assert len(examples) == 8
    for path in examples:
        prompt = json.loads(path.read_text())
        ok, error, outputs, node_errors = asyncio.run(
            dropin.execution.validate_prompt(path.stem, prompt, None)
        )
        assert ok, (path.name, error, node_errors)
        assert outputs, path.name


# -- messages as ComfyUI shows them ---------------------------------------------------------------------
def _validation_details(runtime: ComfyRuntime, prompt: dict[str, Any]) -> list[str]:
    ok, _error, _outputs, errors = asyncio.run(runtime.execution.validate_prompt("msg", prompt, None))
    assert not ok
    return [e["details"] for node in errors.values() for e in node["errors"]]


def _checkpoint_prompt(loader: str, name: str) -> dict[str, Any]:
    return {
        "1": {"class_type": loader, "inputs": {"ckpt_name": name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a fox"}},
        "3": {"class_type": "TestCaptureCONDITIONING", "inputs": {"key": "cond", "value": ["2", 0]}},
    }


def test_stack_down_and_missing_model_are_one_sentence_in_comfyuis_validation(dropin: ComfyRuntime) -> None:
    remote = pack_module("remote")
    missing = _validation_details(dropin, _checkpoint_prompt("LunaStackCheckpointLoader", "nope.sft"))
    unet = dropin.urls["unet"]
    assert missing == [
        f"ckpt_name - The Luna Stack UNET service at {unet} (LUNA_UNET_URL) does not serve "
        "checkpoints/nope.sft: put the file into checkpoints/ under the stack's model roots (share "
        f"the models folder with ComfyUI), or pick one it serves: {', '.join(_listed_checkpoints(dropin))}."
    ]
    dead = "http://127.0.0.1:9"
    saved = remote._shared
    nowhere = remote.PackSettings({"clip": dead, "vae": dead, "unet": dead}, None, None)
    remote._shared = remote.Services(nowhere)
    try:
        down = _validation_details(dropin, _checkpoint_prompt("LunaStackCheckpointLoader", CKPT))
        listed = _input_list(dropin.nodes, "LunaStackCheckpointLoader", "ckpt_name")
    finally:
        remote._shared.close()
        remote._shared = saved
    assert down == [
        f"ckpt_name - The Luna Stack UNET service is not reachable at {dead} (LUNA_UNET_URL) (connection "
        "refused): start the stack (`luna-stack run`, or `make up` with Docker) or point LUNA_UNET_URL at it."
    ]
    # While the stack is down the list is ComfyUI's own for that folder (the same names), never empty.
    assert listed == _input_list(dropin.nodes, "CheckpointLoaderSimple", "ckpt_name")


def _listed_checkpoints(runtime: ComfyRuntime) -> list[str]:
    return _input_list(runtime.nodes, "LunaStackCheckpointLoader", "ckpt_name")[:8]


def test_a_lora_the_services_cannot_see_fails_in_loraloader(dropin: ComfyRuntime) -> None:
    prompt = {
        "1": {"class_type": "LunaStackCheckpointLoader", "inputs": {"ckpt_name": CKPT}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "comfy-only-lora.safetensors",  # in ComfyUI's loras folder only
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a fox"}},
        "4": {"class_type": "TestCaptureCONDITIONING", "inputs": {"key": "cond", "value": ["3", 0]}},
    }
    [(_event, error)] = execute(dropin, prompt)
    assert error["node_type"] == "LoraLoader", error
    assert error["exception_type"] == "luna_stack.client.errors.LunaStackModelMissing", error
    assert error["exception_message"].strip() == (
        "LoRA 'comfy-only-lora.safetensors' is in ComfyUI's loras folder, but the Luna Stack UNET service at "
        f"{dropin.urls['unet']} (LUNA_UNET_URL) cannot see it: put the same file at "
        "loras/comfy-only-lora.safetensors under the stack's model roots (share the loras folder with "
        "ComfyUI) and queue the prompt again."
    )


# -- zero-edit mode -------------------------------------------------------------------------------------
def test_zero_edit_routes_comfyuis_loaders_to_the_stack_and_falls_back_with_a_log_line(
    dropin: ComfyRuntime, tmp_path: Path
) -> None:
    nodes = dropin.nodes
    model_proxy, clip_proxy, vae_proxy = (pack_module(m) for m in ("model_proxy", "clip_proxy", "vae_proxy"))
    with zero_edit("1"), pack_log() as log:
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)
        assert model_proxy.is_remote(model) and isinstance(clip, clip_proxy.ClipProxy)
        assert isinstance(vae, vae_proxy.VaeProxy) and vae.model == f"checkpoints/{CKPT}"
        (unet,) = nodes.UNETLoader().load_unet("sd15-small-unet.safetensors", "default")
        assert model_proxy.is_remote(unet)
        (clip_l,) = nodes.CLIPLoader().load_clip("clip_l.safetensors", "stable_diffusion")
        assert isinstance(clip_l, clip_proxy.ClipProxy) and clip_l.family == "sd15"
        (pair,) = nodes.DualCLIPLoader().load_clip("clip_l.safetensors", "clip_g.safetensors", "sdxl")
        assert isinstance(pair, clip_proxy.ClipProxy) and pair.family == "sdxl"
        (small_vae,) = nodes.VAELoader().load_vae("sd15-small-vae.safetensors")
        assert isinstance(small_vae, vae_proxy.VaeProxy)
        assert log == []
        # Not served by the stack: ComfyUI loads it itself, and the log says why.
        (pixels,) = nodes.VAELoader().load_vae("pixel_space")
        assert not isinstance(pixels, vae_proxy.VaeProxy)
        [line] = log
        assert line.startswith(
            "Luna Stack zero-edit: VAELoader loads 'pixel_space' locally: The Luna Stack VAE service at "
            f"{dropin.urls['vae']} (LUNA_VAE_URL) does not serve vae/pixel_space: put the file into vae/"
        )
        local_model, _clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint("local-only.safetensors")
        assert not model_proxy.is_remote(local_model)
        assert "CheckpointLoaderSimple loads 'local-only.safetensors' locally" in log[-1]
    del local_model, _clip, _vae
    from comfy import model_management

    model_management.unload_all_models()
    # Off (the default, or LUNA_ZERO_EDIT=0): ComfyUI's own loader, untouched.
    with zero_edit(None):
        (own,) = nodes.VAELoader().load_vae("sd15-full-vae.safetensors")
    assert type(own).__module__ == "comfy.sd"
    # The pack's setting, as ComfyUI's settings dialog saves it, turns it on when the variable is not set.
    import folder_paths

    user_dir = folder_paths.get_user_directory()
    folder_paths.set_user_directory(str(tmp_path / "user"))  # never into the ComfyUI checkout
    try:
        settings = pack_module("zero_edit").settings_file()
        assert settings == tmp_path / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"Comfy.Locale": "en", "LunaStack.ZeroEdit": True}))
        with zero_edit(None):
            (shared,) = nodes.VAELoader().load_vae("sd15-full-vae.safetensors")
        with zero_edit("0"):
            (off,) = nodes.VAELoader().load_vae("sd15-full-vae.safetensors")
    finally:
        folder_paths.set_user_directory(user_dir)
    assert isinstance(shared, vae_proxy.VaeProxy) and type(off).__module__ == "comfy.sd"


# -- ControlNet and T2I-Adapters on a shared MODEL ------------------------------------------------------
@pytest.fixture(scope="module")
def control_models(comfy: ComfyRuntime) -> ComfyRuntime:
    files = {
        "controlnet/sd15-controlnet.sft": lambda p: write_controlnet(p, "sd15", "full", seed=1),
        "controlnet/sd15-t2i.sft": lambda p: write_t2i_adapter(p, "sd15", seed=2),
        f"unet/{LITE_UNET}": lambda p: write_unet(p, "sdxl", "full", seed=3, depth=SDXL_LITE_DEPTH),
        "controlnet/sdxl-controlnet.sft": lambda p: write_controlnet(
            p, "sdxl", "full", seed=4, depth=SDXL_LITE_DEPTH
        ),
        "controlnet/sdxl-t2i.sft": lambda p: write_t2i_adapter(p, "sdxl", seed=5),
    }
    for name, write in files.items():
        if not (comfy.models / name).exists():
            write(comfy.models / name)
    return comfy


def control_workflow(family: str, shared: bool) -> dict[str, Any]:
    """The same latent sampled without control, with a ControlNet (over part of the schedule), with a
    T2I-Adapter, and with both chained; SD1.5 from its checkpoint, SDXL from a diffusion-model file with
    given conditioning (the UNet side is what the control changes)."""
    if family == "sd15":
        loader = {"class_type": "LunaStackCheckpointLoader" if shared else "CheckpointLoaderSimple"}
        loader["inputs"] = {"ckpt_name": CKPT}
        text = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a (red:1.2) fox"}}
        negative = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}}
    else:
        loader = {"class_type": "LunaStackUNetLoader" if shared else "UNETLoader"}
        loader["inputs"] = {"unet_name": LITE_UNET, **({} if shared else {"weight_dtype": "default"})}
        text = {"class_type": "TestSDXLConditioning", "inputs": {"seed": 1}}
        negative = {"class_type": "TestSDXLConditioning", "inputs": {"seed": 2}}

    def apply(positive: list, negative: list, net: str, strength: float, start: float, end: float) -> dict:
        inputs = {"positive": positive, "negative": negative, "control_net": [net, 0], "image": ["7", 0]}
        inputs |= {"strength": strength, "start_percent": start, "end_percent": end}
        return {"class_type": "ControlNetApplyAdvanced", "inputs": inputs}

    def sample(positive: list, negative: list) -> dict:
        inputs = {"model": ["1", 0], "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler"}
        inputs |= {"scheduler": "normal", "positive": positive, "negative": negative}
        inputs |= {"latent_image": ["4", 0], "denoise": 1.0}
        return {"class_type": "KSampler", "inputs": inputs}

    prompt = {
        "1": loader,
        "2": text,
        "3": negative,
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "ControlNetLoader",
            "inputs": {"control_net_name": f"{family}-controlnet.sft"},
        },
        "6": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": f"{family}-t2i.sft"}},
        "7": {"class_type": "TestImage", "inputs": {"seed": 3}},
        "8": apply(["2", 0], ["3", 0], "5", 0.9, 0.0, 0.7),
        "9": apply(["2", 0], ["3", 0], "6", 1.0, 0.0, 1.0),
        "10": apply(["8", 0], ["8", 1], "6", 0.8, 0.0, 1.0),
        "11": sample(["2", 0], ["3", 0]),
        "12": sample(["8", 0], ["8", 1]),
        "13": sample(["9", 0], ["9", 1]),
        "14": sample(["10", 0], ["10", 1]),
    }
    for node, key in (("11", "plain"), ("12", "controlnet"), ("13", "t2i"), ("14", "both")):
        prompt[f"2{node}"] = {"class_type": "TestCaptureLATENT", "inputs": {"key": key, "value": [node, 0]}}
    return prompt


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_and_t2i_adapter_on_a_shared_model_match_comfyui_local(
    control_models: ComfyRuntime, family: str
) -> None:
    shared = run(control_models, control_workflow(family, shared=True))
    unload(f"checkpoints/{CKPT}" if family == "sd15" else f"unet/{LITE_UNET}", ("UNET",))
    local = run(control_models, control_workflow(family, shared=False))
    keys = ("plain", "controlnet", "t2i", "both")
    agreement = {k: rel(local[k]["samples"], shared[k]["samples"]) for k in keys}
    effect = {
        k: rel(local[a]["samples"], local[k]["samples"])
        for k, a in (("controlnet", "plain"), ("t2i", "plain"), ("both", "controlnet"))
    }
    print(f"{family} ControlNet max |local - shared| / max |local|:", agreement, "control effect:", effect)
    for key, value in agreement.items():
        assert value < RTOL, (key, agreement)
    # The control really acts, far beyond the tolerance (and the chained adapter on top of the ControlNet).
    assert min(effect.values()) > 100 * RTOL, effect


# -- the repository installed into a ComfyUI checkout ---------------------------------------------------
_LOAD_WITH_COMFYUI = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[2])
from tests.comfyui_import import import_comfyui  # (imports no luna_stack: the pack brings its own)
execution, folder_paths, nodes = import_comfyui(sys.argv[1])
started = time.monotonic()
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
import luna_stack
print(json.dumps({
    "seconds": time.monotonic() - started,
    "luna_stack": luna_stack.__file__,
    "nodes": sorted(n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("Luna")),
    "dirs": {k: v for k, v in nodes.LOADED_MODULE_DIRS.items() if "luna" in k},
    "web": nodes.EXTENSION_WEB_DIRS,
    "routed": getattr(nodes.CheckpointLoaderSimple.load_checkpoint, "_luna_zero_edit", False),
}))
"""


def test_the_repository_installs_into_a_comfyui_checkout_as_a_pack(tmp_path: Path) -> None:
    assert COMFYUI_PATH is not None
    started = time.monotonic()
    comfyui = tmp_path / "ComfyUI"

    def skip(folder: str, names: list[str]) -> list[str]:  # the code, without caches or the models folder
        return [
            n for n in names if n in (".git", "__pycache__") or (n == "models" and folder == COMFYUI_PATH)
        ]

    shutil.copytree(COMFYUI_PATH, comfyui, ignore=skip)
    (comfyui / "models").mkdir()
    pack = install_as_pack(comfyui / "custom_nodes")  # = git clone <repo> custom_nodes/luna-stack
    # pip install -r requirements.txt, as ComfyUI-Manager does: here everything is present already, and
    # --no-index proves that nothing would be fetched.
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "-r", str(pack / "requirements.txt")],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # luna_stack from the pack alone
    loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_COMFYUI, str(comfyui), str(ROOT)],
        cwd=comfyui,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert Path(result["luna_stack"]) == pack / "services" / "__init__.py"
    assert result["dirs"] == {"luna-stack": str(pack)}
    assert Path(result["web"]["luna-stack"]) == pack / "web"
    assert len(result["nodes"]) == 13 and "LunaStackTripleCLIPLoader" in result["nodes"]
    assert result["routed"] is True  # zero-edit routing installed (off until enabled)
    failed = [line for line in loaded.stderr.splitlines() if "IMPORT FAILED" in line and "luna-stack" in line]
    assert failed == [], loaded.stderr[-4000:]
    seconds = time.monotonic() - started
    print(f"pack install test: {seconds:.1f} s (ComfyUI's custom-node loading {result['seconds']:.1f} s)")
