"""Flux / SD3 text encoding against real ComfyUI: its tokenizers and its own text-encoder classes on the same
fixture files as the CLIP service.

- Tokens: ComfyUI's FluxTokenizer / SD3Tokenizer (`l`, `g`, `t5xxl`) == the service's tokenize op.
- Conditioning: comfy.sd.CLIP built as load_text_encoder_state_dicts builds it for clip_type FLUX (flux_clip +
  FluxTokenizer) and SD3 (sd3_clip + SD3Tokenizer), the fixture widths given through ComfyUI's own
  `<name>_model_config` model options, and each file loaded with ComfyUI's load_sd into its encoder.
  (comfy.sd.load_clip itself cannot take the tiny fixtures: it recognises T5-XXL by block 23 being 4096
  wide and routes CLIP-G by its 31st layer.) cond / pooled from ComfyUI's encode_from_tokens_scheduled ==
  the service's within float32 rounding (ComfyUI's T5 attention scales k by sqrt(d_kv) and lets SDPA
  divide it out; transformers leaves the scores unscaled).
SD3's CLIP part needs more than two layers in ComfyUI (it asserts that layer -2 is an inner one) and T5
beside it a 4096-wide T5 (the CLIP part is padded to 4096 before T5 is appended), both too big here: SD3
conditioning is compared for T5 alone (test_clip_t5.py checks the CLIP-L/G rules against transformers),
its tokens for all three encoders. Needs COMFYUI_PATH.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from .comfyui_harness import COMFYUI_PATH, requires_comfyui
from .comfyui_import import import_comfyui

if COMFYUI_PATH:  # ComfyUI before transformers (see comfyui_harness)
    import_comfyui(COMFYUI_PATH)

from luna_stack.client.http import AsyncClient
from luna_stack.clip.family import build
from luna_stack.devtools.fixtures import clip_config, write_clip
from luna_stack.devtools.fixtures_t5 import t5_config, write_t5

from .conftest import make_settings
from .test_clip_conditioning import LONG, SHORT, WEIGHTED
from .test_t5_tokenizer import GOLDEN

pytestmark = requires_comfyui
PROMPTS = [p for p, _, _ in GOLDEN if "embedding:" not in p] + [LONG, SHORT, WEIGHTED]
FLUX = "clip_l.safetensors+t5xxl.safetensors"


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """fp16 files, as users have them: ComfyUI keeps text-encoder weights in fp16 even on the CPU (and
    computes in float32), so both sides then see the same weight values."""
    root = tmp_path_factory.mktemp("comfy_text")
    write_clip(root / "clip" / "clip_l.safetensors", "l", "small", seed=4, dtype=torch.float16)
    write_clip(root / "clip" / "clip_g.safetensors", "g", "small", seed=4, dtype=torch.float16)
    write_t5(root / "clip" / "t5xxl.safetensors", "small", seed=4, dtype=torch.float16)
    return root


def _options() -> dict:
    """ComfyUI's per-encoder config overrides (SDClipModel reads `<model_name>_model_config`)."""
    l_cfg, g_cfg, t5 = clip_config("l", "small"), clip_config("g", "small"), t5_config("small")
    clip_keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "projection_dim",
    )
    t5_keys = ("d_model", "d_ff", "num_layers", "num_heads", "d_kv")
    return {
        "clip_l_model_config": {k: l_cfg[k] for k in clip_keys},
        "clip_g_model_config": {k: g_cfg[k] for k in clip_keys},
        "t5xxl_model_config": {k: t5[k] for k in t5_keys},
    }


def _comfy_clip(clip_type: str, files: dict, models_dir):
    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    target = type("ClipTarget", (), {})()  # what load_text_encoder_state_dicts fills in
    target.params = {}
    if clip_type == "flux":
        target.clip = comfy.text_encoders.flux.flux_clip()
        target.tokenizer = comfy.text_encoders.flux.FluxTokenizer
    else:
        target.clip = comfy.text_encoders.sd3_clip.sd3_clip(
            clip_l="l" in files, clip_g="g" in files, t5="t5xxl" in files
        )
        target.tokenizer = comfy.text_encoders.sd3_clip.SD3Tokenizer
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options=_options())
    encoders = {"l": "clip_l", "g": "clip_g", "t5xxl": "t5xxl"}
    for key, name in files.items():
        sd = load_file(models_dir / "clip" / name)
        missing, unexpected = getattr(clip.cond_stage_model, encoders[key]).load_sd(sd)
        assert not unexpected, unexpected[:3]
        assert not [k for k in missing if "text_projection" not in k and "position_ids" not in k], missing[:3]
    return clip


def _comfy_encode(clip, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ((cond, extra),) = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return cond.float(), extra["pooled_output"].float()


def _strip(tokens: dict) -> dict:
    return {
        k: [[[int(t), round(float(w), 6)] for t, w, *_ in chunk] for chunk in v] for k, v in tokens.items()
    }


async def test_tokens_and_conditioning_equal_comfyui(text_models, start_service):
    models_dir = text_models
    flux = _comfy_clip("flux", {"l": "clip_l.safetensors", "t5xxl": "t5xxl.safetensors"}, models_dir)
    from comfy.text_encoders.sd3_clip import SD3Tokenizer

    sd3_tokenizer = SD3Tokenizer(embedding_directory=None)
    sd3_t5 = _comfy_clip("sd3", {"t5xxl": "t5xxl.safetensors"}, models_dir)
    svc = start_service(build, make_settings(models_dir))
    async with AsyncClient("clip", url=svc.url) as client:
        for text in PROMPTS:
            _, tok = await client.call("tokenize", params={"model": FLUX, "text": text})
            assert _strip(tok["tokens"]) == _strip(flux.tokenize(text))
            triple = {"model": "clip_l.safetensors+clip_g.safetensors+t5xxl.safetensors", "text": text}
            _, tok = await client.call("tokenize", params=triple)
            assert _strip(tok["tokens"]) == _strip(sd3_tokenizer.tokenize_with_weights(text))  # g, l, t5xxl

        for text in (SHORT, WEIGHTED, LONG, ""):
            cases = [
                (flux, {"model": FLUX}),
                (sd3_t5, {"model": "t5xxl.safetensors"}),
            ]
            for comfy_clip, params in cases:
                want_cond, want_pooled = _comfy_encode(comfy_clip, text)
                out, _ = await client.call("encode", params={**params, "text": text, "cache": False})
                assert out["cond"].shape == want_cond.shape and out["pooled"].shape == want_pooled.shape
                torch.testing.assert_close(out["cond"], want_cond, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(out["pooled"], want_pooled, rtol=1e-4, atol=1e-4)

        # CLIPSetLastLayer reaches T5 too in ComfyUI
        flux.clip_layer(-2)
        want_cond, want_pooled = _comfy_encode(flux, WEIGHTED)
        out, _ = await client.call("encode", params={"model": FLUX, "text": WEIGHTED, "clip_skip": -2})
        torch.testing.assert_close(out["cond"], want_cond, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["pooled"], want_pooled, rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_pack_clip_proxy_through_comfyui_nodes(text_models, start_service):
    """ComfyUI's CLIPTextEncodeFlux (two tokenize calls, guidance in add_dict) and CLIPTextEncode on the
    pack's ClipProxy (family flux, ComfyUI's FluxTokenizer) == the same nodes on ComfyUI's own CLIP."""
    import nodes as comfy_nodes_builtin
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy_extras.nodes_flux import CLIPTextEncodeFlux

    from comfy_nodes.clip_proxy import ClipProxy
    from comfy_nodes.remote import Services
    from comfy_nodes.settings import PackSettings
    from luna_stack.devtools.embedded import free_port

    local = _comfy_clip("flux", {"l": "clip_l.safetensors", "t5xxl": "t5xxl.safetensors"}, text_models)
    svc = start_service(build, make_settings(text_models))
    dead = f"http://127.0.0.1:{free_port()}"
    services = Services(PackSettings({"clip": svc.url, "vae": dead, "unet": dead}, None, None))
    try:
        proxy = ClipProxy(services, FLUX, "flux", tokenizer=FluxTokenizer(embedding_directory=None))
        ((want, want_extra),) = CLIPTextEncodeFlux.execute(local, SHORT, WEIGHTED, 3.5).result[0]
        ((got, got_extra),) = CLIPTextEncodeFlux.execute(proxy, SHORT, WEIGHTED, 3.5).result[0]
        assert got_extra["guidance"] == want_extra["guidance"] == 3.5
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            got_extra["pooled_output"], want_extra["pooled_output"].float(), rtol=1e-4, atol=1e-4
        )
        ((want, want_extra),) = comfy_nodes_builtin.CLIPTextEncode().encode(local, LONG)[0]
        ((got, got_extra),) = comfy_nodes_builtin.CLIPTextEncode().encode(proxy, LONG)[0]
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            got_extra["pooled_output"], want_extra["pooled_output"].float(), rtol=1e-4, atol=1e-4
        )
    finally:
        services.close()
