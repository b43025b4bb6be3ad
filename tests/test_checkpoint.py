"""Checkpoint layouts, detection and config inference, checked against diffusers' own converters.

diffusers' single-file converters (convert_ldm_vae_checkpoint, convert_ldm_unet_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) are the reference for what a loader does
with an LDM file: our LDM dicts must go through them into a strict load with bitwise-equal tensors,
and our own reverse mapping must give exactly what they give.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from luna_stack.devtools import fixtures
from luna_stack.weights import checkpoint, ldm_layout
from luna_stack.wire.errors import ModelLoadError


def _seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory()


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


# ------------------------------------------------------------------------------ layout round trips


def test_vae_round_trip_through_diffusers_converter() -> None:
    config = fixtures.vae_config("small")
    model = _seeded(lambda: AutoencoderKL(**config))
    reference = model.state_dict()
    ldm = ldm_layout.vae_diffusers_to_ldm(reference)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in ldm  # LDM counts decoder levels from the bottom
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.down.1.block.0.nin_shortcut.weight" not in ldm  # 32 -> 32: no shortcut conv
    assert "encoder.down.2.block.0.nin_shortcut.weight" in ldm

    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, config)
    loaded = AutoencoderKL(**config)
    loaded.load_state_dict(converted, strict=True)
    _assert_same(loaded.state_dict(), reference)
    _assert_same(ldm_layout.vae_ldm_to_diffusers(ldm, config), reference)


def test_vae_reverse_map_ignores_training_keys_and_reports_missing() -> None:
    config = fixtures.vae_config("small")
    ldm = ldm_layout.vae_diffusers_to_ldm(_seeded(lambda: AutoencoderKL(**config)).state_dict())
    with_loss = {**ldm, "loss.logvar": torch.zeros(())}
    assert (
        ldm_layout.vae_ldm_to_diffusers(with_loss, config).keys()
        == AutoencoderKL(**config).state_dict().keys()
    )
    del ldm["decoder.mid.attn_1.k.bias"]
    with pytest.raises(ModelLoadError) as err:
        ldm_layout.vae_ldm_to_diffusers(ldm, config)
    assert err.value.details["missing"] == ["decoder.mid.attn_1.k.bias"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_round_trip_through_diffusers_converter(family: str) -> None:
    config = fixtures.unet_config(family, "small")
    reference = _seeded(lambda: UNet2DConditionModel(**config)).state_dict()
    ldm = ldm_layout.unet_diffusers_to_ldm(reference, config)
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, config)
    loaded = UNet2DConditionModel(**config)
    loaded.load_state_dict(converted, strict=True)
    _assert_same(loaded.state_dict(), reference)
    _assert_same(ldm_layout.unet_ldm_to_diffusers(ldm, config), reference)


def test_unet_ldm_names_match_the_real_files() -> None:
    sd15 = set(ldm_layout.unet_key_map(fixtures.unet_config("sd15", "full")).values())
    sdxl = set(ldm_layout.unet_key_map(fixtures.unet_config("sdxl", "full")).values())
    assert len(sd15) == 686 and len(sdxl) == 1680  # key counts of the released SD1.5 / SDXL UNets
    for key in (
        "time_embed.0.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.1.1.proj_in.weight",
        "output_blocks.2.1.conv.weight",  # level without attention: upsampler in slot 1
        "output_blocks.5.2.conv.weight",  # level with attention: upsampler in slot 2
        "output_blocks.11.0.skip_connection.weight",
        "out.2.weight",
    ):
        assert key in sd15, key
    for key in (
        "label_emb.0.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
    ):
        assert key in sdxl, key
    assert not any(k.startswith("output_blocks.8.") and ".conv." in k for k in sdxl)


def test_unet_module_names_for_lora() -> None:
    sd15 = ldm_layout.unet_ldm_to_diffusers_module_names(fixtures.unet_config("sd15", "full"))
    assert sd15["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert sd15["output_blocks.9.1.transformer_blocks.0.attn2.to_out.0"] == (
        "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_out.0"
    )
    assert sd15["middle_block.0.in_layers.2"] == "mid_block.resnets.0.conv1"
    assert sd15["middle_block.2.emb_layers.1"] == "mid_block.resnets.1.time_emb_proj"
    assert sd15["input_blocks.0.0"] == "conv_in"
    assert sd15["time_embed.2"] == "time_embedding.linear_2"
    assert sd15["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    sdxl = ldm_layout.unet_ldm_to_diffusers_module_names(fixtures.unet_config("sdxl", "full"))
    assert sdxl["label_emb.0.0"] == "class_embedding.linear_1"
    assert sdxl["input_blocks.8.1.transformer_blocks.9.ff.net.0.proj"] == (
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"
    )
    # every Linear / Conv2d is covered once, and the LDM names are exactly the file's weight names
    model_keys = set(ldm_layout.unet_key_map(fixtures.unet_config("sdxl", "full")).values())
    assert all(f"{ldm}.weight" in model_keys for ldm in sdxl)
    assert len(set(sdxl.values())) == len(sdxl)


def _clip(which: str, cls):
    return _seeded(lambda: cls(CLIPTextConfig(**fixtures.clip_config(which, "small")))).eval()


def _strict_load(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(ldm_layout.clip_hf_for_model(sd, model), strict=True)


def test_clip_l_checkpoint_keys_load_through_diffusers_converter() -> None:
    reference = _clip("l", CLIPTextModel)
    hf = ldm_layout.clip_hf_canonical(reference.state_dict())
    assert all(k.startswith("text_model.") for k in hf)
    file_sd = {f"conditioner.embedders.0.transformer.{k}": v for k, v in hf.items()}
    converted = convert_ldm_clip_checkpoint(file_sd)
    loaded = CLIPTextModel(CLIPTextConfig(**checkpoint.clip_config_from_state_dict(converted, "clip_l")))
    _strict_load(loaded, converted)
    _assert_same(loaded.state_dict(), reference.state_dict())


def test_clip_g_openclip_round_trip_through_diffusers_converter() -> None:
    reference = _clip("g", CLIPTextModelWithProjection)
    openclip = ldm_layout.clip_hf_to_openclip(reference.state_dict())
    width = fixtures.clip_config("g", "small")["hidden_size"]
    assert openclip["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert torch.equal(openclip["text_projection"], reference.state_dict()["text_projection.weight"].T)
    assert {"positional_embedding", "ln_final.weight", "transformer.resblocks.1.mlp.c_proj.bias"} <= set(
        openclip
    )

    prefix = "conditioner.embedders.1.model."
    loaded = CLIPTextModelWithProjection(CLIPTextConfig(**fixtures.clip_config("g", "small")))
    converted = convert_open_clip_checkpoint(
        loaded, {prefix + k: v for k, v in openclip.items()}, prefix=prefix
    )
    loaded.load_state_dict(converted, strict=True)
    _assert_same(loaded.state_dict(), reference.state_dict())

    ours = ldm_layout.clip_openclip_to_hf({**openclip, "logit_scale": torch.ones(())})
    _assert_same(ours, ldm_layout.clip_hf_canonical(reference.state_dict()))
    with pytest.raises(ModelLoadError):
        ldm_layout.clip_openclip_to_hf({**openclip, "visual.proj": torch.ones(1)})


# ------------------------------------------------------------------------------------------ loading


def test_load_state_dict_prefix_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a.w": torch.arange(6.0).reshape(2, 3), "b.w": torch.ones(4, dtype=torch.float16)}, str(path))
    assert checkpoint.load_state_dict(path).keys() == {"a.w", "b.w"}
    only_a = checkpoint.load_state_dict(path, prefix="a.")
    assert list(only_a) == ["w"] and torch.equal(only_a["w"], torch.arange(6.0).reshape(2, 3))
    shapes = checkpoint.load_shapes(path)
    assert shapes["a.w"].shape == (2, 3) and shapes["b.w"].dtype == torch.float16
    assert shapes["a.w"].device.type == "meta"


def test_load_state_dict_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(1024)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    bad_header = tmp_path / "header.safetensors"
    bad_header.write_bytes(struct.pack("<Q", 5) + b"{nope")
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(good.read_bytes())
    for path in (truncated, garbage, bad_header, pickled, tmp_path / "absent.safetensors"):
        with pytest.raises(ModelLoadError) as err:
            checkpoint.load_state_dict(path)
        assert err.value.status == 422
        assert path.name in err.value.message
    assert checkpoint.load_state_dict(good)["w"].shape == (1024,)


def test_component_strips_prefix() -> None:
    sd = {"first_stage_model.a": torch.zeros(1), "model.diffusion_model.b": torch.ones(1)}
    assert list(checkpoint.component(sd, "first_stage_model.")) == ["a"]
    assert checkpoint.component(sd, "") == sd


# ---------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_detect_full_size_layouts_like_diffusers(family: str) -> None:
    shapes = fixtures.checkpoint_shapes(family, "full")
    info = checkpoint.detect(shapes)
    assert info.family == family and info.kind == "checkpoint"
    assert infer_diffusers_model_type(shapes) == {"sd15": "v1", "sdxl": "xl_base"}[family]
    assert info.require("unet").prefix == "model.diffusion_model."
    assert info.require("vae") == checkpoint.Component("vae", "first_stage_model.", "ldm")
    clip_l = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}[family]
    assert info.require("clip_l") == checkpoint.Component("clip_l", clip_l, "hf")
    if family == "sdxl":
        assert info.require("clip_g") == checkpoint.Component(
            "clip_g", "conditioner.embedders.1.model.", "openclip"
        )
    else:
        assert info.get("clip_g") is None
        with pytest.raises(ModelLoadError):
            info.require("clip_g")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("size", ["small", "full"])
def test_configs_inferred_from_shapes(family: str, size: str) -> None:
    shapes = fixtures.checkpoint_shapes(family, size)
    unet = checkpoint.unet_config_from_state_dict(checkpoint.component(shapes, "model.diffusion_model."))
    assert unet == fixtures.unet_config(family, size)
    vae = checkpoint.vae_config_from_state_dict(checkpoint.component(shapes, "first_stage_model."))
    assert vae == fixtures.vae_config(size)
    info = checkpoint.detect(shapes)
    clip_l = checkpoint.component(shapes, info.require("clip_l").prefix)
    assert checkpoint.clip_config_from_state_dict(clip_l, "clip_l") == fixtures.clip_config("l", size)
    assert checkpoint.clip_kind(clip_l) == "clip_l"
    if family == "sdxl":
        clip_g = ldm_layout.clip_openclip_to_hf(checkpoint.component(shapes, info.require("clip_g").prefix))
        assert checkpoint.clip_config_from_state_dict(clip_g) == fixtures.clip_config("g", size)


def test_full_size_sdxl_config_is_diffusers_sdxl() -> None:
    config = checkpoint.unet_config_from_state_dict(
        checkpoint.component(fixtures.checkpoint_shapes("sdxl", "full"), "model.diffusion_model.")
    )
    assert config["block_out_channels"] == [320, 640, 1280]
    assert config["transformer_layers_per_block"] == [1, 2, 10]
    assert config["attention_head_dim"] == [5, 10, 20]
    assert config["cross_attention_dim"] == 2048
    assert config["projection_class_embeddings_input_dim"] == 2816


def test_detect_standalone_files(tmp_path: Path) -> None:
    vae = checkpoint.detect(checkpoint.load_state_dict(fixtures.write_vae(tmp_path / "v.safetensors")))
    assert (vae.kind, vae.family, vae.components) == (
        "vae",
        "unknown",
        (checkpoint.Component("vae", "", "ldm"),),
    )

    diffusers_vae = _seeded(lambda: AutoencoderKL(**fixtures.vae_config("small"))).state_dict()
    info = checkpoint.detect(diffusers_vae)
    assert info.kind == "vae" and info.require("vae").layout == "diffusers"
    as_ldm = ldm_layout.vae_diffusers_to_ldm(diffusers_vae)
    assert checkpoint.vae_config_from_state_dict(as_ldm) == fixtures.vae_config("small")

    for family in ("sd15", "sdxl"):
        unet = checkpoint.detect(
            checkpoint.load_shapes(fixtures.write_unet(tmp_path / "u.safetensors", family))
        )
        assert (unet.kind, unet.family, unet.require("unet").layout) == ("unet", family, "ldm")

    cases = [("l", "hf", "clip_l"), ("g", "hf", "clip_g"), ("g", "openclip", "clip_g")]
    for which, layout, kind in cases:
        path = fixtures.write_clip(tmp_path / f"clip_{which}_{layout}.safetensors", which, layout=layout)
        info = checkpoint.detect(checkpoint.load_shapes(path))
        assert info.kind == kind and info.components == (checkpoint.Component(kind, "", layout),)


def test_detect_real_width_clip_without_projection_hint() -> None:
    # a real-width CLIP-L that carries an (identity) projection, as ComfyUI saves it, is still CLIP-L
    sd = {
        "text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, device="meta"),
        "text_projection.weight": torch.empty(768, 768, device="meta"),
    }
    assert checkpoint.clip_kind(sd) == "clip_l"


def test_detect_unknown() -> None:
    info = checkpoint.detect({"foo.weight": torch.zeros(1)})
    assert (info.family, info.kind, info.components) == ("unknown", "unknown", ())


def test_detect_clip_without_text_model_level() -> None:
    # transformers >= 5.6 CLIPTextModel state dicts and some old SD1.x files have no `text_model.` level
    flat = {k.removeprefix("text_model."): v for k, v in _clip("l", CLIPTextModel).state_dict().items()}
    assert not any(k.startswith("text_model.") for k in flat)
    info = checkpoint.detect(flat)
    assert info.components == (checkpoint.Component("clip_l", "", "hf"),)
    assert checkpoint.clip_config_from_state_dict(flat) == fixtures.clip_config("l", "small")
    old_sd1 = checkpoint.detect({f"cond_stage_model.transformer.{k}": v for k, v in flat.items()})
    assert (old_sd1.family, old_sd1.require("clip_l").prefix) == ("sd15", "cond_stage_model.transformer.")
