"""Random-weight fixture files: real layouts, deterministic, loadable by diffusers' converters, sane outputs.

The reference models here are built only with diffusers' / transformers' own converters from the
written files, independently of luna_stack's loaders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from luna_stack.devtools import fixtures
from luna_stack.weights import checkpoint, ldm_layout

# Parameter counts of the released models; the full-size configs must reproduce them exactly.
REAL_PARAMS = {
    ("sd15", "model."): 859_520_964,
    ("sdxl", "model."): 2_567_463_684,
    ("sd15", "first_stage_model."): 83_653_863,
    ("sd15", "cond_stage_model."): 123_060_480,
    ("sdxl", "conditioner.embedders.0."): 123_060_480,
    ("sdxl", "conditioner.embedders.1."): 694_659_840,
}


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "sdxl.safetensors", "sdxl", seed=3)


@pytest.mark.parametrize(("family", "prefix"), list(REAL_PARAMS))
def test_full_size_matches_the_released_models(family: str, prefix: str) -> None:
    shapes = fixtures.checkpoint_shapes(family, "full")
    assert sum(t.numel() for k, t in shapes.items() if k.startswith(prefix)) == REAL_PARAMS[(family, prefix)]


def test_file_is_plain_safetensors_with_metadata(sdxl_file: Path) -> None:
    with safe_open(str(sdxl_file), framework="pt") as f:
        assert f.metadata() == {"luna_fixture": "checkpoint", "family": "sdxl", "size": "small", "seed": "3"}
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float16
    assert set(keys) == set(fixtures.checkpoint_shapes("sdxl", "small"))
    assert sdxl_file.stat().st_size < 40 * 2**20
    assert not list(sdxl_file.parent.glob("*.tmp"))


def test_deterministic_per_seed(tmp_path: Path, sdxl_file: Path) -> None:
    again = fixtures.write_checkpoint(tmp_path / "again.safetensors", "sdxl", seed=3)
    assert again.read_bytes() == sdxl_file.read_bytes()
    other = checkpoint.load_state_dict(
        fixtures.write_checkpoint(tmp_path / "other.safetensors", "sdxl", seed=4)
    )
    first = checkpoint.load_state_dict(sdxl_file)
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    assert not torch.equal(first[key], other[key])


def test_block_wise_materialisation_does_not_change_weights(
    tmp_path: Path, sdxl_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # force the full-size code path (one small subtree at a time) on the small model
    monkeypatch.setattr(fixtures, "_CHUNK_PARAMS", 5_000)
    chunked = checkpoint.load_state_dict(
        fixtures.write_checkpoint(tmp_path / "c.safetensors", "sdxl", seed=3)
    )
    whole = checkpoint.load_state_dict(sdxl_file)
    assert chunked.keys() == whole.keys()
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)


def test_standalone_files_hold_the_checkpoint_weights(tmp_path: Path, sdxl_file: Path) -> None:
    full = checkpoint.load_state_dict(sdxl_file)
    vae = checkpoint.load_state_dict(fixtures.write_vae(tmp_path / "vae.safetensors", "sdxl", seed=3))
    unet = checkpoint.load_state_dict(fixtures.write_unet(tmp_path / "unet.safetensors", "sdxl", seed=3))
    clip_l = checkpoint.load_state_dict(fixtures.write_clip(tmp_path / "l.safetensors", "l", seed=3))
    clip_g = checkpoint.load_state_dict(fixtures.write_clip(tmp_path / "g.safetensors", "g", seed=3))
    for part, prefix in (
        (vae, "first_stage_model."),
        (unet, "model.diffusion_model."),
        (clip_l, "conditioner.embedders.0.transformer."),
        (ldm_layout.clip_hf_to_openclip(clip_g), "conditioner.embedders.1.model."),
    ):
        expected = checkpoint.component(full, prefix)
        assert part.keys() == expected.keys()
        assert all(torch.equal(part[k], expected[k]) for k in part)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = checkpoint.load_state_dict(fixtures.write_vae(tmp_path / "vae.safetensors", dtype=dtype))
    assert {t.dtype for t in sd.values()} == {dtype}
    with pytest.raises(ValueError):
        fixtures.write_vae(tmp_path / "bad.safetensors", dtype=torch.int8)


def _finite_and_varied(tensor: torch.Tensor) -> None:
    assert torch.isfinite(tensor).all()
    assert tensor.float().std() > 1e-3


def test_vae_loads_with_diffusers_and_runs_in_fp16(sdxl_file: Path) -> None:
    sd = checkpoint.load_state_dict(sdxl_file)
    config = fixtures.vae_config("small")
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True)
    vae = vae.half().eval()
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 3, 64, 64, dtype=torch.float16) * 2 - 1).latent_dist.mean
        image = vae.decode(latent).sample
    assert latent.shape == (1, 4, 8, 8) and image.shape == (1, 3, 64, 64)
    _finite_and_varied(latent)
    _finite_and_varied(image)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_loads_with_diffusers_and_runs_in_fp16(tmp_path: Path, family: str) -> None:
    sd = checkpoint.load_state_dict(fixtures.write_checkpoint(tmp_path / "m.safetensors", family))
    config = fixtures.unet_config(family, "small")
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    unet = unet.half().eval()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    context = torch.randn(2, 77, config["cross_attention_dim"], dtype=torch.float16)
    y = None
    if family == "sdxl":
        y = torch.randn(2, config["projection_class_embeddings_input_dim"], dtype=torch.float16)
    with torch.no_grad():
        out = unet(x, torch.tensor([999, 1]), context, class_labels=y).sample
    assert out.shape == x.shape
    _finite_and_varied(out)


def test_text_encoders_load_with_transformers_and_run_in_fp16(sdxl_file: Path) -> None:
    sd = checkpoint.load_state_dict(sdxl_file)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    clip_l = CLIPTextModel(CLIPTextConfig(**fixtures.clip_config("l", "small")))
    clip_l.load_state_dict(ldm_layout.clip_hf_for_model(convert_ldm_clip_checkpoint(sd), clip_l), strict=True)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**fixtures.clip_config("g", "small")))
    prefix = "conditioner.embedders.1.model."
    clip_g.load_state_dict(convert_open_clip_checkpoint(clip_g, sd, prefix=prefix), strict=True)
    with torch.no_grad():
        hidden_l = clip_l.half().eval()(tokens, output_hidden_states=True).hidden_states[-2]
        out_g = clip_g.half().eval()(tokens, output_hidden_states=True)
    assert hidden_l.shape == (1, 77, 32) and out_g.hidden_states[-2].shape == (1, 77, 64)
    assert out_g.text_embeds.shape == (1, 64)
    for tensor in (hidden_l, out_g.hidden_states[-2], out_g.text_embeds):
        _finite_and_varied(tensor)


def test_models_dir_layout_and_cli_hook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fixtures.main_fixtures(tmp_path, "small", ("sd15",)) == 0
    for folder in ("checkpoints", "vae", "clip", "unet", "loras", "embeddings"):
        assert (tmp_path / folder).is_dir()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors"))
    assert files == [
        "checkpoints/sd15-small.safetensors",
        "clip/clip_l.safetensors",
        "clip/t5xxl.safetensors",
        "unet/flux-dev-small.safetensors",
        "unet/flux-schnell-small.safetensors",
        "unet/sd15-small-unet.safetensors",
        "unet/sd3-small.safetensors",
        "unet/sd3.5-large-small.safetensors",
        "unet/sd3.5-medium-small.safetensors",
        "vae/flux-small-ae.safetensors",
        "vae/sd15-small-vae.safetensors",
        "vae/sd3-small-vae.safetensors",
    ]
    assert "sd15_checkpoint" in capsys.readouterr().out
    info = checkpoint.detect(checkpoint.load_shapes(tmp_path / "checkpoints/sd15-small.safetensors"))
    assert (info.family, info.kind) == ("sd15", "checkpoint")


@pytest.mark.slow
def test_full_size_sd15_checkpoint_file(tmp_path: Path) -> None:
    path = fixtures.write_checkpoint(tmp_path / "sd15.safetensors", "sd15", "full")
    shapes = checkpoint.load_shapes(path)
    assert checkpoint.detect(shapes).family == "sd15"
    assert checkpoint.unet_config_from_state_dict(
        checkpoint.component(shapes, "model.diffusion_model.")
    ) == fixtures.unet_config("sd15", "full")
    assert path.stat().st_size > 2 * (859_520_964 + 83_653_863 + 123_060_480)
