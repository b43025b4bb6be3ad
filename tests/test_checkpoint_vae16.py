"""Detection of the 16-channel VAEs and of the Flux / SD3 diffusion models beside them, from keys and
shapes only (meta tensors: full-size layouts without the bytes)."""

from __future__ import annotations

import pytest
import torch

from luna_stack.devtools import fixtures
from luna_stack.devtools.fixtures_vae16 import vae16_config, vae16_shapes
from luna_stack.weights import checkpoint
from luna_stack.weights.checkpoint import Component

# Parameters of Black Forest Labs' ae.safetensors (Flux.1); SD3's VAE has the same architecture.
FLUX_AE_PARAMS = 83_819_683


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16, device="meta")


# The keys of the released diffusion models that detection looks at (ComfyUI's model_detection looks
# for the same blocks), with their real shapes.
FLUX_DIT = {
    "double_blocks.0.img_attn.qkv.weight": _meta(9216, 3072),
    "single_blocks.0.linear1.weight": _meta(21504, 3072),
    "img_in.weight": _meta(3072, 64),
}
SD3_DIT = {
    "joint_blocks.0.context_block.attn.qkv.weight": _meta(4608, 1536),
    "x_embedder.proj.weight": _meta(1536, 16, 2, 2),
    "final_layer.linear.weight": _meta(64, 1536),
}


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def test_full_size_flux_vae_is_the_released_one_and_its_config_is_inferred() -> None:
    shapes = vae16_shapes("full")
    assert sum(t.numel() for t in shapes.values()) == FLUX_AE_PARAMS
    assert not any("quant_conv" in k for k in shapes)  # neither Flux's nor SD3's VAE has quant convs
    assert shapes["decoder.conv_in.weight"].shape[1] == 16
    assert shapes["encoder.conv_out.weight"].shape[0] == 32  # mean and log-variance
    config = checkpoint.vae_config_from_state_dict(shapes)
    assert config == vae16_config("full")
    assert config["use_quant_conv"] is False and config["use_post_quant_conv"] is False


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_standalone_16_channel_vae(layout: str) -> None:
    info = checkpoint.detect(vae16_shapes("small", layout=layout))
    assert (info.family, info.kind, info.components) == ("unknown", "vae", (Component("vae", "", layout),))


@pytest.mark.parametrize(
    ("dit", "vae_prefix", "layout", "family"),
    [(FLUX_DIT, "vae.", "bfl", "flux"), (SD3_DIT, "first_stage_model.", "sai", "sd3")],
    ids=["flux", "sd3"],
)
def test_all_in_one_checkpoints(dit: dict, vae_prefix: str, layout: str, family: str) -> None:
    sd = {**_prefixed(dit, "model.diffusion_model."), **vae16_shapes("full", prefix=vae_prefix)}
    info = checkpoint.detect(sd)
    assert (info.family, info.kind) == (family, "checkpoint")
    assert info.require("unet") == Component("unet", "model.diffusion_model.", layout)
    assert info.require("vae") == Component("vae", vae_prefix, "ldm")
    vae = checkpoint.component(sd, vae_prefix)
    assert checkpoint.vae_config_from_state_dict(vae)["latent_channels"] == 16


@pytest.mark.parametrize(("dit", "layout", "family"), [(FLUX_DIT, "bfl", "flux"), (SD3_DIT, "sai", "sd3")])
def test_bare_diffusion_models(dit: dict, layout: str, family: str) -> None:
    info = checkpoint.detect(dit)
    assert (info.family, info.kind, info.components) == (family, "unet", (Component("unet", "", layout),))


def test_one_marker_is_not_enough() -> None:
    # A Flux double block alone (e.g. a LoRA or a partial file) is no diffusion model.
    info = checkpoint.detect({"double_blocks.0.img_attn.qkv.weight": _meta(9216, 3072)})
    assert (info.family, info.kind, info.components) == ("unknown", "unknown", ())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sd_checkpoints_are_still_detected_as_before(family: str) -> None:
    info = checkpoint.detect(fixtures.checkpoint_shapes(family, "full"))
    assert info.family == family
    assert info.require("unet") == Component("unet", "model.diffusion_model.", "ldm")
    assert info.require("vae") == Component("vae", "first_stage_model.", "ldm")
