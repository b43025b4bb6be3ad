"""LoRA file parsing and binding to module names: every key layout, LDM names, and each bad input's error."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from luna_stack.devtools.lora_fixtures import tiny_clip, tiny_unet, write_lora
from luna_stack.lora import load_lora_bytes, parse_lora, resolve
from luna_stack.wire.errors import BadRequest, ModelLoadError


@pytest.fixture(scope="module")
def sdxl_unet():
    return tiny_unet(sdxl=True)


@pytest.fixture(scope="module")
def clip_l():
    return tiny_clip(projection=False)


def _pair(rank: int, in_dim: int, out_dim: int, kernel: tuple[int, int] | None = None):
    down = torch.randn(rank, in_dim, *kernel) if kernel else torch.randn(rank, in_dim)
    return down, torch.randn(out_dim, rank, *((1, 1) if kernel else ()))


def _kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> dict:
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


# kohya SDXL names (LDM paths, underscore-joined) -> the diffusers module they adapt, written out by hand
# for tiny_unet(sdxl=True): 2 levels, 2 resnets per level, attention in level 1, up level 0 attends.
SDXL_KOHYA_NAMES = {
    "lora_unet_input_blocks_0_0": ("conv_in", (4, 32, (3, 3))),
    "lora_unet_time_embed_2": ("time_embedding.linear_2", (128, 128, None)),
    "lora_unet_label_emb_0_0": ("class_embedding.linear_1", (48, 128, None)),
    "lora_unet_input_blocks_1_0_in_layers_2": ("down_blocks.0.resnets.0.conv1", (32, 32, (3, 3))),
    "lora_unet_input_blocks_2_0_emb_layers_1": ("down_blocks.0.resnets.1.time_emb_proj", (128, 32, None)),
    "lora_unet_input_blocks_3_0_op": ("down_blocks.0.downsamplers.0.conv", (32, 32, (3, 3))),
    "lora_unet_input_blocks_4_0_skip_connection": ("down_blocks.1.resnets.0.conv_shortcut", (32, 64, (1, 1))),
    "lora_unet_input_blocks_4_1_proj_in": ("down_blocks.1.attentions.0.proj_in", (64, 64, None)),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        (64, 64, None),
    ),
    "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_k": (
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
        (32, 64, None),
    ),
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        (64, 64, None),
    ),
    "lora_unet_middle_block_2_out_layers_3": ("mid_block.resnets.1.conv2", (64, 64, (3, 3))),
    "lora_unet_output_blocks_0_0_skip_connection": ("up_blocks.0.resnets.0.conv_shortcut", (128, 64, (1, 1))),
    "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj": (
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
        (64, 512, None),
    ),
    "lora_unet_output_blocks_2_2_conv": ("up_blocks.0.upsamplers.0.conv", (64, 64, (3, 3))),
    "lora_unet_output_blocks_5_0_in_layers_2": ("up_blocks.1.resnets.2.conv1", (64, 32, (3, 3))),
    "lora_unet_out_2": ("conv_out", (32, 4, (3, 3))),
}


def test_kohya_sdxl_ldm_names_resolve_to_the_right_diffusers_modules(sdxl_unet):
    sd, expected = {}, {}
    for key, (module, (in_dim, out_dim, kernel)) in SDXL_KOHYA_NAMES.items():
        down, up = _pair(4, in_dim, out_dim, kernel)
        sd.update(_kohya(key, down, up, alpha=2.0))
        expected[module] = (down, up)
    lora = resolve(parse_lora(sd, "sdxl-names"), sdxl_unet, "unet")
    assert not lora.unmatched
    assert set(lora.factors) == set(expected)
    for module, (down, up) in expected.items():
        f = lora.factors[module]
        assert torch.equal(f.down.flatten(1), down.flatten(1)) and torch.equal(f.up.flatten(1), up.flatten(1))
        assert f.scale == 0.5
        is_conv = isinstance(sdxl_unet.get_submodule(module), torch.nn.Conv2d)
        assert f.down.dim() == (4 if is_conv else 2)


def test_kohya_sd15_diffusers_names_and_text_encoder_prefixes(clip_l):
    unet = tiny_unet(sdxl=False)
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    proj_in = "down_blocks.0.attentions.0.proj_in"  # a 1x1 conv in SD1.5: factors may come 2-D
    sd = _kohya("lora_unet_" + to_q.replace(".", "_"), *_pair(4, 32, 32))
    sd |= _kohya("lora_unet_" + proj_in.replace(".", "_"), *_pair(4, 32, 32))
    lora = resolve(parse_lora(sd), unet, "unet")
    assert set(lora.factors) == {to_q, proj_in}
    conv = lora.factors[proj_in]
    assert conv.down.shape == (4, 32, 1, 1) and conv.up.shape == (32, 4, 1, 1)
    assert lora.factors[to_q].scale == 1.0  # no alpha: alpha = rank

    for prefix, component in (("lora_te_", "clip_l"), ("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")):
        parsed = parse_lora(_kohya(f"{prefix}text_model_encoder_layers_1_mlp_fc1", *_pair(2, 32, 64)))
        assert parsed.components == (component,) and parsed.format == "kohya"
        assert set(resolve(parsed, clip_l, component).factors) == {"encoder.layers.1.mlp.fc1"}


@pytest.mark.parametrize(
    ("down_key", "up_key", "fmt", "component", "module"),
    [
        (
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight",
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
            "peft",
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        ),
        (  # PEFT save of a bare UNet: no prefix, or base_model.model.
            "base_model.model.mid_block.attentions.0.proj_out.lora_A.weight",
            "base_model.model.mid_block.attentions.0.proj_out.lora_B.weight",
            "peft",
            "unet",
            "mid_block.attentions.0.proj_out",
        ),
        (
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.lora_A.weight",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.lora_B.weight",
            "peft",
            "unet",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
        ),
        (  # old diffusers LoRACompatibleLinear
            "unet.up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q.lora.down.weight",
            "unet.up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q.lora.up.weight",
            "diffusers",
            "unet",
            "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q",
        ),
        (  # old diffusers attention processors: to_out_lora adapts to_out.0
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
            "diffusers",
            "unet",
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        ),
        (
            "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn1.to_v.lora_A.weight",
            "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn1.to_v.lora_B.weight",
            "ldm",
            "unet",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v",
        ),
        (
            "diffusion_model.output_blocks.1.1.proj_in.lora_down.weight",
            "diffusion_model.output_blocks.1.1.proj_in.lora_up.weight",
            "ldm",
            "unet",
            "up_blocks.0.attentions.1.proj_in",
        ),
    ],
)
def test_dotted_layouts_parse_and_resolve(sdxl_unet, down_key, up_key, fmt, component, module):
    target = sdxl_unet.get_submodule(module)
    down, up = _pair(3, target.in_features, target.out_features)
    parsed = parse_lora({down_key: down, up_key: up})
    assert parsed.format == fmt and parsed.components == (component,)
    lora = resolve(parsed, sdxl_unet, component)
    assert list(lora.factors) == [module]
    assert torch.equal(lora.factors[module].down, down)


def test_text_encoder_dotted_layouts(clip_l):
    clip_g = tiny_clip(projection=True)
    q_proj = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    fc2 = "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"
    sd = {
        f"{q_proj}.lora_linear_layer.down.weight": torch.randn(2, 32),
        f"{q_proj}.lora_linear_layer.up.weight": torch.randn(32, 2),
        f"{fc2}.lora_A.weight": torch.randn(2, 64),
        f"{fc2}.lora_B.weight": torch.randn(32, 2),
    }
    parsed = parse_lora(sd)
    assert parsed.format == "diffusers+peft" and parsed.components == ("clip_l", "clip_g")
    # CLIPTextModel (transformers >= 5.6) has no text_model level; WithProjection still has it.
    assert list(resolve(parsed, clip_l, "clip_l").factors) == ["encoder.layers.0.self_attn.q_proj"]
    assert list(resolve(parsed, clip_g, "clip_g").factors) == ["text_model.encoder.layers.1.mlp.fc2"]
    assert not resolve(parsed, clip_g, "unet").factors  # no keys for the component: an empty adapter


def test_alpha_from_keys_metadata_and_default():
    name = "lora_unet_a"
    parsed = parse_lora(_kohya(name, *_pair(8, 4, 4), alpha=4.0))
    assert parsed.targets[0].factors.scale == 0.5
    peft = {
        "unet.x.to_q.lora_A.weight": torch.randn(4, 8),
        "unet.x.to_q.lora_B.weight": torch.randn(8, 4),
        "unet.x.to_k.lora_A.weight": torch.randn(4, 8),
        "unet.x.to_k.lora_B.weight": torch.randn(8, 4),
    }
    config = {"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": {"to_k": 16}}
    parsed = parse_lora(peft, metadata={"lora_adapter_metadata": json.dumps(config)})
    assert {t.name: t.factors.alpha for t in parsed.targets} == {"x.to_k": 16.0, "x.to_q": 2.0}
    assert {t.factors.alpha for t in parse_lora(peft).targets} == {4.0}  # absent: alpha = rank


def test_written_files_round_trip(sdxl_unet, tmp_path):
    path = tmp_path / "k.safetensors"
    truth = write_lora(
        path, sdxl_unet, "unet", fmt="kohya", rank=2, alpha=1.0, targets="all", unet_ldm_names=True
    )
    parsed = load_lora_bytes(path.read_bytes(), path.name)
    assert parsed.name == "k.safetensors" and parsed.format == "kohya" and parsed.rank == 2
    assert len(parsed.targets) == len(truth) and not parsed.ignored
    assert parsed.nbytes == sum(f.nbytes for f in truth.values())


# ------------------------------------------------------------------------------------------ bad inputs


def test_corrupt_or_truncated_file_is_a_clear_error(sdxl_unet, tmp_path):
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_lora_bytes(b"\x00\x01not a safetensors file at all", "junk.safetensors")
    path = tmp_path / "t.safetensors"
    write_lora(path, sdxl_unet, "unet")
    data = path.read_bytes()
    with pytest.raises(ModelLoadError, match=r"t\.safetensors is not a readable safetensors file"):
        load_lora_bytes(data[: len(data) // 2], "t.safetensors")


def test_lora_for_another_architecture_matches_nothing(sdxl_unet):
    # kohya Flux names: lora_unet_ too, but none of them exists in an SD UNet
    sd = _kohya("lora_unet_double_blocks_0_img_attn_qkv", *_pair(4, 64, 192))
    sd |= _kohya("lora_unet_single_blocks_3_linear1", *_pair(4, 64, 64))
    message = r"does not fit model UNet2DConditionModel: 0 of 2 unet modules matched — is it for another"
    with pytest.raises(BadRequest, match=message):
        resolve(parse_lora(sd, "flux.safetensors"), sdxl_unet, "unet")


def test_unmatched_keys_are_counted_not_fatal(sdxl_unet, caplog):
    sd = _kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", *_pair(2, 64, 64))
    sd |= _kohya("lora_unet_input_blocks_9_1_transformer_blocks_0_attn1_to_q", *_pair(2, 64, 64))
    lora = resolve(parse_lora(sd), sdxl_unet, "unet")
    assert len(lora.factors) == 1 and lora.unmatched == ("input_blocks_9_1_transformer_blocks_0_attn1_to_q",)
    assert "lora key not loaded: input_blocks_9_1" in caplog.text


def test_shape_mismatch_names_the_module(sdxl_unet):
    sd = _kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", *_pair(4, 48, 64))
    with pytest.raises(BadRequest, match=r"does not fit module .*attn1\.to_q.*Linear\(64→64\)"):
        resolve(parse_lora(sd, "wide.safetensors"), sdxl_unet, "unet")
    sd = _kohya("lora_unet_input_blocks_1_0_in_layers_2", *_pair(4, 32, 32, (1, 1)))  # 1x1 on a 3x3 conv
    with pytest.raises(BadRequest, match=r"Conv2d\(32→32, 3x3\)"):
        resolve(parse_lora(sd), sdxl_unet, "unet")


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        (
            _kohya("lora_unet_a", torch.full((2, 4), float("nan")), torch.ones(4, 2)),
            "down factor of a contains NaN",
        ),
        (
            _kohya("lora_unet_a", torch.ones(2, 4), torch.tensor([[float("inf"), 0.0]] * 4)),
            "up factor .* NaN or inf",
        ),
        (
            _kohya("lora_unet_a", torch.ones(2, 4), torch.ones(4, 2), alpha=float("nan")),
            "alpha is not finite",
        ),
        (_kohya("lora_unet_a", torch.ones(2, 4), torch.ones(4, 3)), "rank mismatch in a"),
        ({"lora_unet_a.lora_down.weight": torch.ones(2, 4)}, "module a of unet has no up factor"),
        ({"lora_unet_a.hada_w1_a": torch.ones(2, 4)}, "is a LoHa adapter"),
        (
            {"lora_unet_a.dora_scale": torch.ones(1, 4)}
            | _kohya("lora_unet_a", torch.ones(2, 4), torch.ones(4, 2)),
            "DoRA",
        ),
        ({"model.diffusion_model.conv_in.weight": torch.ones(2, 4)}, "holds no LoRA factors"),
    ],
)
def test_broken_factors_are_clear_errors(sd, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_lora(sd, "bad")


def test_nan_in_a_file_fails_at_load(tmp_path):
    path = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(
        _kohya("lora_unet_a", torch.ones(2, 4), torch.full((4, 2), float("nan"))), path
    )
    with pytest.raises(ModelLoadError, match=r"nan\.safetensors: up factor of a contains NaN"):
        load_lora_bytes(path.read_bytes(), path.name)


def test_unet_outside_the_ldm_layout_still_takes_diffusers_names(caplog):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # per-level layers_per_block: no SD1.5/SDXL LDM layout
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=(1, 2),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = _kohya("lora_unet_" + to_q.replace(".", "_"), *_pair(2, 32, 32))
    assert list(resolve(parse_lora(sd), unet, "unet").factors) == [to_q]
    ldm = _kohya("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", *_pair(2, 32, 32))
    with pytest.raises(BadRequest, match="0 of 1 unet modules matched"):
        resolve(parse_lora(ldm), unet, "unet")
    assert "LDM-named LoRA keys cannot match this UNet" in caplog.text
