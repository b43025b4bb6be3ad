"""The ComfyUI pack without ComfyUI: conversions, LoRA stacks, error mapping, import hygiene, and the
Luna-compatible nodes and the VAE / CLIP proxies against real running services."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes, remote
from comfy_nodes.clip_proxy import ClipProxy
from comfy_nodes.errors import LunaNodeError, RemotePatchError, check_remote_safe, user_error
from comfy_nodes.lora_stack import LORA_OPTION, LoraStack, add_to_options, lora_name, stack_in
from comfy_nodes.remote import Services
from comfy_nodes.settings import PackSettings
from comfy_nodes.vae_proxy import VaeProxy
from comfy_nodes.wire import conditioning, control_to_wire, image_to_wire, size_params, tokens_to_wire
from luna_stack.clip.family import build as build_clip
from luna_stack.devtools.embedded import free_port
from luna_stack.devtools.fixtures import clip_config, unet_config
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.unet.family import build as build_unet
from luna_stack.vae.family import build as build_vae
from luna_stack.wire.errors import Unavailable, UnknownModel

from .conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
SD15 = "checkpoints/sd15-small.safetensors"


def services_for(**urls: str) -> Services:
    """Services with the given URLs; every other kind points at a closed port."""
    dead = f"http://127.0.0.1:{free_port()}"
    return Services(PackSettings({k: urls.get(k, dead) for k in ("clip", "vae", "unet")}, None, None))


# -- conversions -----------------------------------------------------------------------------------------
def test_tokens_to_wire_keeps_ids_and_weights_and_drops_word_ids() -> None:
    tokens = {"l": [[(49406, 1.0, 0), (320, 1.2, 1), (49407, 1.0, 0)]], "g": [[(49406, 1.0), (0, 1.0)]]}
    assert tokens_to_wire(tokens) == {
        "l": [[[49406, 1.0], [320, 1.2], [49407, 1.0]]],
        "g": [[[49406, 1.0], [0, 1.0]]],
    }


def test_tokens_to_wire_refuses_local_embeddings() -> None:
    with pytest.raises(LunaNodeError, match="embedding"):
        tokens_to_wire({"l": [[(49406, 1.0), (torch.zeros(768), 1.0)]]})


def test_conditioning_and_latent_have_comfyui_layout() -> None:
    cond, pooled = torch.randn(1, 77, 768), torch.randn(1, 768)
    [[c, extra]] = conditioning(cond, pooled, size_params({"width": 832.0, "height": 1216, "text": "x"}))
    assert c is cond and extra["pooled_output"] is pooled
    assert extra["width"] == 832 and extra["height"] == 1216 and "text" not in extra
    image = torch.rand(2, 16, 24, 4, dtype=torch.float16)
    wire = image_to_wire(image)
    assert (
        wire.shape == (2, 16, 24, 3)
        and wire.dtype == torch.float32
        and torch.equal(wire, image[..., :3].float())
    )
    with pytest.raises(LunaNodeError, match="IMAGE"):
        image_to_wire(torch.rand(16, 24, 3))


def test_control_to_wire_names_residuals_by_list_index_without_nones() -> None:
    a, b, m = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    tensors, lengths = control_to_wire({"input": [None, a, None], "middle": [m], "output": []})
    assert set(tensors) == {"control.input.1", "control.middle.0"}
    assert tensors["control.input.1"] is a and lengths == {"input": 3, "middle": 1}
    assert control_to_wire(None) == ({}, {})
    with pytest.raises(LunaNodeError, match="kind"):
        control_to_wire({"extra": [b]})


# -- LoRA stacks -----------------------------------------------------------------------------------------
def test_lora_stack_is_immutable_and_skips_zero_strength(tmp_path: Path) -> None:
    base = LoraStack()
    one = base.add("style.safetensors", 0.8)
    two = one.add("detail.safetensors", 1).add("off.safetensors", 0.0)
    assert not base and base.entries == () and one.entries == (("style.safetensors", 0.8),)
    assert two.to_wire() == [
        {"name": "style.safetensors", "strength": 0.8},
        {"name": "detail.safetensors", "strength": 1.0},
    ]
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    assert (
        lora_name(str(loras / "sub" / "a.safetensors"), [str(tmp_path / "x"), str(loras)])
        == "sub/a.safetensors"
    )


def test_lora_stack_travels_in_transformer_options_as_plain_data() -> None:
    options: dict = {"patches": {}}
    add_to_options(options, "a.safetensors", 0.5)
    add_to_options(options, "b.safetensors", 0.0)
    add_to_options(options, "c.safetensors", 1.0)
    assert options[LORA_OPTION] == [
        {"name": "a.safetensors", "strength": 0.5},
        {"name": "c.safetensors", "strength": 1.0},
    ]
    assert stack_in(options).entries == (("a.safetensors", 0.5), ("c.safetensors", 1.0))
    assert stack_in({}) == LoraStack()


def test_patches_that_cannot_run_remotely_are_refused() -> None:
    check_remote_safe({"patches": {}, "patches_replace": {}, "sigmas": 1, LORA_OPTION: []})
    check_remote_safe({"patches": {"output_block_patch": []}})  # empty lists: nothing to run
    with pytest.raises(RemotePatchError, match=r"UNet patches \(output_block_patch\)"):
        check_remote_safe({"patches": {"output_block_patch": [print]}})
    with pytest.raises(RemotePatchError, match="attn1"):
        check_remote_safe({"patches_replace": {"attn1": {("input", 1, 0): print}}})


# -- errors and configuration ----------------------------------------------------------------------------
def test_user_errors_say_what_to_do() -> None:
    unreachable = Unavailable("cannot reach", details={"reason": "connection refused"})
    down = user_error(unreachable, "vae", "http://h:1 (LUNA_VAE_URL)")
    assert str(down) == (
        "The Luna Stack VAE service is not reachable at http://h:1 (LUNA_VAE_URL) (connection refused): "
        "start the stack (`luna-stack run`, or `make up` with Docker) or point LUNA_VAE_URL at it."
    )
    missing = user_error(UnknownModel("no model 'x'"), "unet", "u")
    assert "does not have that model: no model 'x'" in str(missing) and "model roots" in str(missing)
    assert type(down).__name__ == "LunaStackUnavailable" and type(missing).__name__ == "LunaStackModelMissing"


def test_settings_from_environment() -> None:
    env = {"LUNA_VAE_URL": "http://gpu:8102", "LUNA_REDIS_URL": "redis://r:6379/0", "LUNA_TOKEN": "t"}
    s = PackSettings.from_env(env)
    assert s.urls == {"clip": None, "vae": "http://gpu:8102", "unet": None} and s.token == "t"
    assert "LUNA_VAE_URL" in s.describe("vae") and "redis://r:6379/0" in s.describe("clip")


def test_service_down_is_a_readable_node_error() -> None:
    svc = services_for()
    try:
        with pytest.raises(LunaNodeError, match=r"VAE service is not reachable at http://127\.0\.0\.1:\d+"):
            VaeProxy(svc, "vae/x.safetensors").decode(torch.zeros(1, 4, 8, 8))
        text = nodes.format_status(svc.status())
        assert text.count("DOWN") == 3
    finally:
        svc.close()


# -- import hygiene --------------------------------------------------------------------------------------
def test_pack_imports_without_heavy_dependencies_or_comfyui() -> None:
    code = (
        "import sys\n"
        "for m in ('diffusers', 'transformers', 'comfy', 'folder_paths'): sys.modules[m] = None\n"
        "import comfy_nodes\n"
        "assert len(comfy_nodes.NODE_CLASS_MAPPINGS) == 13, comfy_nodes.NODE_CLASS_MAPPINGS\n"
        "print(sorted(m for m in sys.modules if m.startswith('comfy_nodes.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = out.stdout
    # ComfyUI-only modules stay unimported until a loader needs them.
    assert "comfy_nodes.nodes" in loaded and "model_proxy" not in loaded and "comfy_hooks" not in loaded


def test_node_mappings_are_complete() -> None:
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for cls in NODE_CLASS_MAPPINGS.values():
        assert hasattr(cls, cls.FUNCTION) and cls.CATEGORY == "Luna Stack" and len(cls.RETURN_TYPES) >= 1


# -- against running services ----------------------------------------------------------------------------
@pytest.fixture
def pack(monkeypatch: pytest.MonkeyPatch):
    """Point the pack's process-wide Services at the given URLs (closed ports for the rest)."""
    made: list[Services] = []

    def use(**urls: str) -> Services:
        svc = services_for(**urls)
        made.append(svc)
        monkeypatch.setattr(remote, "_shared", svc)
        return svc

    yield use
    for svc in made:
        svc.close()


def test_luna_vae_nodes_and_proxy_against_the_service(
    models_dir: Path, start_service, pack, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = start_service(build_vae, make_settings(models_dir))
    svc = pack(vae=vae.url)
    names = nodes.LunaSharedVAEDecode.INPUT_TYPES()["required"]["vae_name"][0]
    assert "vae/sd15-small-vae.safetensors" in names and SD15 in names  # service names (two folders)
    # The Shared VAE Loader lists vae/ as ComfyUI's VAELoader does.
    listed = nodes.SharedVAELoader.INPUT_TYPES()["required"]["vae_name"][0]
    assert "sd15-small-vae.safetensors" in listed and not any("/" in n for n in listed)

    torch.manual_seed(0)
    samples = torch.randn(1, 4, 12, 16)
    direct, _ = svc.client("vae").call("decode", {"latent": samples}, {"model": SD15})
    (image,) = nodes.LunaSharedVAEDecode().decode({"samples": samples}, SD15)
    assert image.shape == (1, 96, 128, 3) and image.dtype == torch.float32
    assert torch.equal(image, direct["image"])

    (tiled,) = nodes.LunaSharedVAEDecodeTiled().decode({"samples": samples}, SD15, tile_size=64, overlap=16)
    proxy = VaeProxy(svc, SD15)
    assert torch.equal(tiled, proxy.decode_tiled(samples, tile_x=8, tile_y=8, overlap=2))
    assert not torch.equal(tiled, image)  # really the tiled op (random weights: seams are not small)

    pixels = torch.rand(1, 70, 66, 4)  # alpha dropped, cropped to 64x64 like ComfyUI's VAE
    (lat,) = nodes.LunaSharedVAEEncode().encode(pixels, SD15)
    assert lat["samples"].shape == (1, 4, 8, 8)
    assert torch.equal(lat["samples"], proxy.encode(pixels[..., 3:67, 1:65, :3]))
    (lat_tiled,) = nodes.LunaSharedVAEEncodeTiled().encode(pixels, SD15, tile_size=64, overlap=16)
    assert lat_tiled["samples"].shape == (1, 4, 8, 8)

    with pytest.raises(LunaNodeError, match="does not have that model"):
        VaeProxy(svc, "vae/missing.safetensors").decode(samples)
    reports: list[tuple[int, int]] = []
    monkeypatch.setattr(remote, "PROGRESS_POLL_S", 0.02)
    big = torch.randn(1, 4, 32, 32)
    svc.vae_decode(SD15, big, {"tile_x": 8, "tile_y": 8, "overlap": 2}, lambda d, t: reports.append((d, t)))
    assert reports and all(0 <= d <= t and t > 1 for d, t in reports)  # the progress bar moves
    status = nodes.LunaDaemonStatus().status()
    assert "vae: models: " + SD15 in status["result"][0] and status["result"][0].count("DOWN") == 2


def _clip_lora(models_dir: Path) -> str:
    model = CLIPTextModel(CLIPTextConfig(**clip_config("l", "small")))
    write_lora(models_dir / "loras" / "pack-te.safetensors", model, "clip_l", "kohya", rank=4, kohya_te="te")
    return "pack-te.safetensors"


def _comfy_tokens(svc: Services, model: str, text: str) -> dict:
    """Token chunks in ComfyUI's tokenizer format ((id, weight) tuples), here from the service."""
    _, info = svc.call("clip", "tokenize", None, {"model": model, "text": text})
    return {k: [[(int(t), float(w)) for t, w in chunk] for chunk in v] for k, v in info["tokens"].items()}


def test_luna_clip_nodes_and_proxy_against_the_service(models_dir: Path, start_service, pack) -> None:
    lora = _clip_lora(models_dir)
    clip = start_service(build_clip, make_settings(models_dir))
    svc = pack(clip=clip.url)
    text = "a (red:1.2) fox, detailed"
    ([[cond, extra]],) = nodes.LunaSharedCLIPEncode().encode(SD15, text)
    assert cond.shape[0] == 1 and cond.shape[1] == 77 and extra["pooled_output"].shape[0] == 1

    proxy = ClipProxy(svc, SD15, "sd15", tokenizer=_Tokenizer(svc, SD15))
    [[pcond, pextra]] = proxy.encode_from_tokens_scheduled(proxy.tokenize(text), add_dict={"area": 1})
    assert torch.equal(pcond, cond) and torch.equal(pextra["pooled_output"], extra["pooled_output"])
    assert pextra["area"] == 1
    c2, p2 = proxy.encode_from_tokens(proxy.tokenize(text), return_pooled=True)
    assert torch.equal(c2, cond) and torch.equal(p2, extra["pooled_output"])

    with_lora = proxy.with_lora(lora, 1.0)
    assert proxy.lora.entries == () and with_lora.lora.entries == ((lora, 1.0),)
    lora_cond = with_lora.encode_from_tokens(proxy.tokenize(text))
    assert not torch.allclose(lora_cond, cond, atol=1e-4)
    skipped = proxy.clone()
    skipped.clip_layer(-2)
    assert proxy.layer_idx is None and not torch.allclose(skipped.encode(text), cond, atol=1e-4)

    [[pos, _]], [[neg, _]] = nodes.LunaSharedCLIPEncodeDual().encode(SD15, text, "")
    assert torch.equal(pos, cond) and not torch.equal(neg, cond)

    xl = "checkpoints/sdxl-small.safetensors"
    ([[xcond, xextra]],) = nodes.LunaSharedCLIPEncodeSDXL().encode(
        xl, "a fox", "a fox", width=832, height=1216, crop_w=0, crop_h=0, target_width=832, target_height=1216
    )
    assert xextra["width"] == 832 and xextra["target_height"] == 1216 and xcond.shape[1] == 77
    assert svc.clip_family(xl) == "sdxl" and svc.clip_family(SD15) == "sd15"
    with pytest.raises(LunaNodeError, match="is sdxl, not sd15"):
        nodes._clip_proxy(svc, xl, "sd15")


class _Tokenizer:
    """ComfyUI's tokenizer interface backed by the service's own tokenizer (ComfyUI is not installed here)."""

    def __init__(self, svc: Services, model: str):
        self.svc, self.model = svc, model

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: object) -> dict:
        return _comfy_tokens(self.svc, self.model, text)


def test_unet_steps_carry_the_lora_stack(models_dir: Path, start_service, pack) -> None:
    model = UNet2DConditionModel(**unet_config("sd15", "small"))
    write_lora(models_dir / "loras" / "pack-unet.safetensors", model, "unet", "kohya", rank=4, seed=3)
    unet = start_service(build_unet, make_settings(models_dir))
    svc = pack(unet=unet.url)
    assert "sd15-small-unet.safetensors" in nodes.SharedUNetLoader.INPUT_TYPES()["required"]["unet_name"][0]
    assert svc.unet_load(SD15)["family"] == "sd15"
    torch.manual_seed(1)
    cfg = unet_config("sd15", "small")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999.0, 500.0])
    context = torch.randn(2, 77, cfg["cross_attention_dim"])
    plain = svc.unet_step(SD15, x, t, context)
    direct, _ = svc.client("unet").call("step", {"x": x, "timesteps": t, "context": context}, {"model": SD15})
    assert torch.equal(plain, direct["out"])
    stack = LoraStack().add("pack-unet.safetensors", 1.0)
    lora_out = svc.unet_step(SD15, x, t, context, lora=stack)
    assert not torch.allclose(lora_out, plain, atol=1e-5)
    assert torch.equal(svc.unet_step(SD15, x, t, context, lora=stack), lora_out)
    assert torch.equal(svc.unet_step(SD15, x, t, context), plain)  # no leftover from the LoRA request


def test_examples_are_api_format_prompts_with_valid_links(pack) -> None:
    pack()
    examples = sorted((ROOT / "examples").glob("*.json"))
    assert len(examples) >= 3
    used = set()
    for path in examples:
        prompt = json.loads(path.read_text())
        for node_id, node in prompt.items():
            assert set(node) == {"class_type", "inputs"}, (path.name, node_id)
            for value in node["inputs"].values():
                if isinstance(value, list):  # a link: [source node id, output index]
                    source = prompt[value[0]]["class_type"]
                    if source in NODE_CLASS_MAPPINGS:
                        assert value[1] < len(NODE_CLASS_MAPPINGS[source].RETURN_TYPES), (path.name, node_id)
            if node["class_type"] in NODE_CLASS_MAPPINGS:  # (model lists are empty: services are down)
                used.add(node["class_type"])
                declared = NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]
                assert set(node["inputs"]) == set(declared), (path.name, node_id)
    assert {"LunaStackCheckpointLoader", "LunaStackUNetLoader", "LunaStackCLIPLoader"} <= used


def test_services_found_through_the_redis_registry(models_dir: Path, start_service, redis_url: str) -> None:
    start_service(build_vae, make_settings(models_dir, LUNA_REDIS_URL=redis_url))
    svc = Services(PackSettings.from_env({"LUNA_REDIS_URL": redis_url}))
    try:
        image = VaeProxy(svc, SD15).decode(torch.zeros(1, 4, 8, 8))
        assert image.shape == (1, 64, 64, 3)
    finally:
        svc.close()
