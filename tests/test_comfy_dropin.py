"""The pack as a ComfyUI user meets it, without ComfyUI: loader names as ComfyUI lists them, the sentence a
user sees when the stack is down or lacks a file, LoRA visibility, the zero-edit setting, and the
repository installed as a pack (copied into a custom_nodes folder and loaded the way ComfyUI loads one).
With ComfyUI itself: tests/test_comfy_integration.py."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

from comfy_nodes import names, nodes, remote
from comfy_nodes.remote import Services
from comfy_nodes.settings import ZERO_EDIT_SETTING, PackSettings, zero_edit_enabled
from luna_stack.client.errors import LunaStackModelMissing, LunaStackUnavailable
from luna_stack.clip.family import build as build_clip
from luna_stack.devtools.embedded import EmbeddedService, free_port
from luna_stack.unet.family import build as build_unet
from luna_stack.vae.family import build as build_vae

from .comfyui_harness import SERVED_SUFFIXES, install_as_pack
from .conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]


def comfy_listing(*folders: Path) -> list[str]:
    """What ComfyUI's folder_paths.get_filename_list gives for these folders (its documented behaviour:
    paths relative to the folder, symlinks followed, .git skipped, extension case ignored, sorted),
    restricted to the formats the services read."""
    found = set()
    for folder in folders:
        for dirpath, subdirs, files in os.walk(folder, followlinks=True):
            subdirs[:] = [d for d in subdirs if d != ".git"]
            for file in files:
                if os.path.splitext(file)[1].lower() in SERVED_SUFFIXES:
                    found.add(os.path.relpath(os.path.join(dirpath, file), folder))
    return sorted(found)


@pytest.fixture(scope="module")
def layout(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder as users have them: subfolders, ComfyUI's newer folder names, a symlinked folder,
    upper-case suffixes, pickles the services never read, a .git folder. (Files are hard links to the
    session's fixtures: a symlink leaving the model roots would be refused.)"""
    root = tmp_path_factory.mktemp("layout")
    files = {
        "checkpoints/sd15.safetensors": "checkpoints/sd15-small.safetensors",
        "checkpoints/subdir/xl.SAFETENSORS": "checkpoints/sdxl-small.safetensors",
        "checkpoints/.git/ignored.safetensors": "checkpoints/sd15-small.safetensors",
        "unet/sd15-unet.safetensors": "unet/sd15-small-unet.safetensors",
        "diffusion_models/flux/dit.safetensors": "unet/sdxl-small-unet.safetensors",
        "clip/clip_l.safetensors": "clip/clip_l.safetensors",
        "text_encoders/clip_g.safetensors": "clip/clip_g.safetensors",
        "vae/mine/v.safetensors": "vae/sd15-small-vae.safetensors",
        "vae_store/sdxl-small-vae.safetensors": "vae/sdxl-small-vae.safetensors",
        "loras/style.safetensors": "vae/sd15-small-vae.safetensors",  # listed by name only here
        # the files examples/ name
        "checkpoints/v1-5-pruned-emaonly.safetensors": "checkpoints/sd15-small.safetensors",
        "checkpoints/sd_xl_base_1.0.safetensors": "checkpoints/sdxl-small.safetensors",
        "unet/sd_xl_base_1.0_unet.safetensors": "unet/sdxl-small-unet.safetensors",
        "vae/sdxl_vae.safetensors": "vae/sdxl-small-vae.safetensors",
        "unet/flux1-dev.safetensors": "unet/flux-dev-small.safetensors",
        "unet/flux1-schnell.safetensors": "unet/flux-schnell-small.safetensors",
        "unet/sd3.5_large.safetensors": "unet/sd3.5-large-small.safetensors",
        "clip/t5xxl_fp16.safetensors": "clip/t5xxl.safetensors",
        "clip/t5xxl_fp8_e4m3fn.safetensors": "clip/t5xxl.safetensors",
        "vae/ae.safetensors": "vae/flux-small-ae.safetensors",
        "vae/sd3.5_vae.safetensors": "vae/sd3-small-vae.safetensors",
    }
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(models_dir / source, root / name)
    (root / "checkpoints" / "old.ckpt").write_bytes(b"pickle")  # listed by ComfyUI, never read by the stack
    os.symlink(root / "vae_store", root / "vae" / "linked")  # a symlinked folder
    return root


@pytest.fixture(scope="module")
def stack(layout: Path) -> Iterator[dict[str, str]]:
    running = [
        EmbeddedService(build(make_settings(layout))).start() for build in (build_clip, build_vae, build_unet)
    ]
    try:
        for svc in running:
            svc.wait_ready()
        yield {kind: svc.url for kind, svc in zip(("clip", "vae", "unet"), running, strict=True)}
    finally:
        for svc in running:
            svc.stop()


@pytest.fixture
def pack(stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    svc = Services(PackSettings(dict(stack), None, None))
    monkeypatch.setattr(remote, "_shared", svc)
    yield svc
    svc.close()


@pytest.fixture
def pack_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Services, str]]:
    dead = f"http://127.0.0.1:{free_port()}"
    svc = Services(PackSettings({"clip": dead, "vae": dead, "unet": dead}, None, None))
    monkeypatch.setattr(remote, "_shared", svc)
    yield svc, dead
    svc.close()


def _listed(node: type, key: str) -> list[str]:
    return nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"][key][0]


def test_shared_loaders_list_the_names_comfyuis_loaders_list(layout: Path, pack: Services) -> None:
    expected = {
        ("LunaStackCheckpointLoader", "ckpt_name"): comfy_listing(layout / "checkpoints"),
        ("LunaStackUNetLoader", "unet_name"): comfy_listing(layout / "unet", layout / "diffusion_models"),
        ("LunaStackCLIPLoader", "clip_name1"): comfy_listing(layout / "text_encoders", layout / "clip"),
        ("LunaStackVAELoader", "vae_name"): comfy_listing(layout / "vae"),
    }
    for (node, key), names_comfy in expected.items():
        assert _listed(node, key) == names_comfy, node
    assert expected[("LunaStackCheckpointLoader", "ckpt_name")] == [
        "sd15.safetensors",
        "sd_xl_base_1.0.safetensors",
        "subdir/xl.SAFETENSORS",
        "v1-5-pruned-emaonly.safetensors",
    ]
    assert "flux/dit.safetensors" in _listed("LunaStackUNetLoader", "unet_name")
    assert "linked/sdxl-small-vae.safetensors" in _listed("LunaStackVAELoader", "vae_name")
    assert _listed("LunaStackCLIPLoader", "clip_name2") == [
        "none",
        *expected[("LunaStackCLIPLoader", "clip_name1")],
    ]


def test_new_and_old_names_resolve_to_the_same_file(pack: Services) -> None:
    loader = nodes.SharedCheckpointLoader
    for name in ("sd15.safetensors", "checkpoints/sd15.safetensors"):  # ComfyUI's name, the old prefixed one
        assert loader.VALIDATE_INPUTS(name) is True
        assert pack.resolve(names.CHECKPOINTS, name) == "checkpoints/sd15.safetensors"
    assert pack.resolve(names.CHECKPOINTS, "subdir/xl.SAFETENSORS") == "checkpoints/subdir/xl.SAFETENSORS"
    assert (
        pack.resolve(names.DIFFUSION_MODELS, "flux/dit.safetensors")
        == "diffusion_models/flux/dit.safetensors"
    )
    assert (
        pack.resolve(names.DIFFUSION_MODELS, "checkpoints/sd15.safetensors") == "checkpoints/sd15.safetensors"
    )
    assert pack.resolve(names.TEXT_ENCODERS, "clip_g.safetensors") == "text_encoders/clip_g.safetensors"
    assert nodes.SharedUNetLoader.VALIDATE_INPUTS("sd15-unet.safetensors") is True
    assert nodes.SharedCLIPLoader.VALIDATE_INPUTS("clip_l.safetensors", "clip_g.safetensors") is True
    assert nodes.SharedVAELoader.VALIDATE_INPUTS("mine/v.safetensors") is True
    (vae,) = nodes.SharedVAELoader().load("mine/v.safetensors")  # (MODEL / CLIP proxies need ComfyUI)
    assert vae.model == "vae/mine/v.safetensors"


def test_a_missing_model_is_one_sentence_naming_service_url_and_remedy(pack: Services, stack) -> None:
    problem = nodes.SharedCheckpointLoader.VALIDATE_INPUTS("nope.safetensors")
    assert problem == (
        f"The Luna Stack UNET service at {stack['unet']} (LUNA_UNET_URL) does not serve "
        "checkpoints/nope.safetensors: put the file into checkpoints/ under the stack's model roots "
        "(share the models folder with ComfyUI), or pick one it serves: sd15.safetensors, "
        "sd_xl_base_1.0.safetensors, subdir/xl.SAFETENSORS, v1-5-pruned-emaonly.safetensors."
    )
    with pytest.raises(LunaStackModelMissing) as info:
        nodes.SharedVAELoader().load("nope.safetensors")
    assert "does not serve vae/nope.safetensors" in str(info.value) and "mine/v.safetensors" in str(
        info.value
    )
    assert type(info.value).__module__ == "luna_stack.client.errors"  # what ComfyUI's dialog shows


def test_stack_down_is_one_sentence_in_validation_and_at_run_time(pack_down: tuple[Services, str]) -> None:
    _svc, dead = pack_down
    expected = (
        f"The Luna Stack UNET service is not reachable at {dead} (LUNA_UNET_URL) (connection refused): start "
        "the stack (`luna-stack run`, or `make up` with Docker) or point LUNA_UNET_URL at it."
    )
    assert nodes.SharedCheckpointLoader.VALIDATE_INPUTS("sd15.safetensors") == expected
    assert "VAE service is not reachable" in nodes.SharedVAELoader.VALIDATE_INPUTS("v.safetensors")
    assert "CLIP service is not reachable" in nodes.LunaSharedCLIPEncode.VALIDATE_INPUTS(
        "clip/clip_l.safetensors"
    )
    assert _listed("LunaStackCheckpointLoader", "ckpt_name") == []  # outside ComfyUI: its own list is empty
    with pytest.raises(LunaStackUnavailable) as info:
        nodes.SharedUNetLoader().load("sd15-unet.safetensors")
    assert str(info.value) == expected
    unset = PackSettings({"clip": None, "vae": None, "unet": None}, None, None)
    assert unset.describe("vae") == "http://127.0.0.1:8102 (the default)"


def test_a_lora_the_services_cannot_see_is_refused_with_the_reason(pack: Services, stack) -> None:
    pack.require_lora("unet", "style.safetensors")
    pack.require_lora("clip", "style.safetensors")
    with pytest.raises(LunaStackModelMissing) as info:
        pack.require_lora("unet", "only-in-comfyui.safetensors")
    assert str(info.value) == (
        "LoRA 'only-in-comfyui.safetensors' is in ComfyUI's loras folder, but the Luna Stack UNET service "
        f"at {stack['unet']} (LUNA_UNET_URL) cannot see it: put the same file at "
        "loras/only-in-comfyui.safetensors under the stack's model roots (share the loras folder with "
        "ComfyUI) and queue the prompt again."
    )


def test_examples_validate_once_the_named_files_exist(pack: Services) -> None:
    """Every pack node of every example, as ComfyUI validates it: each listed value is in its list, and
    VALIDATE_INPUTS passes (with ComfyUI: tests/test_comfy_integration.py validates the whole prompts)."""
    checked = 0
    for path in sorted((ROOT / "examples").glob("*.json")):
        for node in json.loads(path.read_text()).values():
            cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                continue  # ComfyUI's own node
            for key, spec in cls.INPUT_TYPES()["required"].items():
                if isinstance(spec[0], list):
                    assert node["inputs"][key] in spec[0], (path.name, key)
            if hasattr(cls, "VALIDATE_INPUTS"):
                wanted = inspect.signature(cls.VALIDATE_INPUTS).parameters
                assert cls.VALIDATE_INPUTS(**{k: node["inputs"][k] for k in wanted}) is True, path.name
                checked += 1
    assert checked >= 8


def test_zero_edit_mode_env_wins_over_the_pack_setting(tmp_path: Path) -> None:
    settings = tmp_path / "comfy.settings.json"
    assert zero_edit_enabled({}, settings) is False  # off by default, no settings file
    settings.write_text(json.dumps({ZERO_EDIT_SETTING: True, "Comfy.Other": 1}))
    assert zero_edit_enabled({}, settings) is True
    assert zero_edit_enabled({"LUNA_ZERO_EDIT": "0"}, settings) is False
    settings.write_text(json.dumps({ZERO_EDIT_SETTING: False}))
    assert zero_edit_enabled({"LUNA_ZERO_EDIT": "1"}, settings) is True
    assert zero_edit_enabled({"LUNA_ZERO_EDIT": "on"}, settings) is True
    assert zero_edit_enabled({"LUNA_ZERO_EDIT": "maybe"}, settings) is False
    settings.write_text("{not json")
    assert zero_edit_enabled({}, settings) is False


# -- the repository as a ComfyUI pack --------------------------------------------------------------------
# ComfyUI's own steps for a pack folder (nodes.load_custom_node): a module named by the folder's path,
# its __init__.py executed, then NODE_CLASS_MAPPINGS / WEB_DIRECTORY read from it.
_LOAD_LIKE_COMFYUI = """
import importlib.util, json, os, sys
path = sys.argv[1]
for blocked in ("diffusers", "transformers", "comfy", "folder_paths"):
    sys.modules[blocked] = None  # the pack must not need them (ComfyUI's are absent here)
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
mappings = getattr(module, "NODE_CLASS_MAPPINGS")
import luna_stack, luna_stack.client.http
heavy = sorted(m for m, mod in sys.modules.items() if mod is not None and (
    m.split(".")[0] in ("diffusers", "transformers", "prometheus_client")
    or m.startswith(("aiohttp.web", "luna_stack.server", "luna_stack.devtools"))))
print(json.dumps({"nodes": sorted(mappings), "display": sorted(module.NODE_DISPLAY_NAME_MAPPINGS),
                  "web": module.WEB_DIRECTORY, "luna_stack": luna_stack.__file__, "heavy": heavy}))
"""


def test_the_repository_installs_as_a_comfyui_pack(tmp_path: Path) -> None:
    pack_dir = install_as_pack(tmp_path / "custom_nodes")
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_LIKE_COMFYUI, str(pack_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # luna_stack from the pack alone
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert loaded["nodes"] == sorted(nodes.NODE_CLASS_MAPPINGS) == loaded["display"]
    assert Path(loaded["luna_stack"]) == pack_dir / "services" / "__init__.py"  # the pack's own client
    assert loaded["heavy"] == []
    assert (pack_dir / loaded["web"] / "luna_stack.js").is_file()

    # requirements.txt: the client's dependencies (pyproject's, less torch, which ComfyUI brings), no models
    requirements = [
        line.split(">=")[0].strip()
        for line in (pack_dir / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    project = tomllib.loads((pack_dir / "pyproject.toml").read_text())
    dependencies = [d.split(">=")[0] for d in project["project"]["dependencies"]]
    assert requirements == [d for d in dependencies if d != "torch"]
    assert project["tool"]["comfy"]["DisplayName"] == "Luna Stack" and project["tool"]["comfy"]["PublisherId"]


def test_sampling_on_the_host_is_off_unless_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    assert PackSettings.from_env({}).sample_on_host is False
    assert PackSettings.from_env({"LUNA_SAMPLE_ON_HOST": "1"}).sample_on_host is True
    assert PackSettings.from_env({"LUNA_SAMPLE_ON_HOST": "Yes"}).sample_on_host is True
    assert PackSettings.from_env({"LUNA_SAMPLE_ON_HOST": "off"}).sample_on_host is False
    with caplog.at_level("WARNING", logger="luna_stack.comfy"):
        assert PackSettings.from_env({"LUNA_SAMPLE_ON_HOST": "gpu"}).sample_on_host is False
    assert "LUNA_SAMPLE_ON_HOST='gpu' is neither on (1) nor off (0)" in caplog.text
