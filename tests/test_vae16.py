"""The 16-channel VAEs (Flux's ae.safetensors, SD3's VAE) through the VAE service, against diffusers'
AutoencoderKL run in-process on the same weights; channel mismatches; several VAEs resident by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from luna_stack.client.http import Client
from luna_stack.devtools.fixtures import write_vae
from luna_stack.devtools.fixtures_vae16 import vae16_config, write_vae16
from luna_stack.vae.family import build
from luna_stack.vae.model import load_vae
from luna_stack.vae.tiling import three_pass
from luna_stack.weights.checkpoint import load_state_dict
from luna_stack.wire.errors import InvalidTensor

from .conftest import make_settings

FLUX = "vae/flux-small-ae.safetensors"  # BFL naming, as Flux ships ae.safetensors
SD3 = "vae/sd3-small-vae.safetensors"  # diffusers naming, as SD3's vae/ folder ships it
SD3_CKPT = "checkpoints/sd3-vae-part.safetensors"  # the VAE of an all-in-one SD3 file (LDM naming)
FLUX_CKPT = "checkpoints/flux-vae-part.safetensors"  # the VAE of a ComfyUI all-in-one Flux file
SDXL = "vae/sdxl-small-vae.safetensors"
# model name -> (prefix of the VAE in the file, layout)
FILES = {
    FLUX: ("", "ldm"),
    SD3: ("", "diffusers"),
    SD3_CKPT: ("first_stage_model.", "ldm"),
    FLUX_CKPT: ("vae.", "ldm"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files write_models_dir registers, plus the VAE parts of SD3 / Flux checkpoints and an SDXL VAE."""
    root = tmp_path_factory.mktemp("vae16")
    write_vae16(root / FLUX, "flux", dtype=torch.float32)
    write_vae16(root / SD3, "sd3", dtype=torch.float32, layout="diffusers")
    write_vae16(root / SD3_CKPT, "sd3", dtype=torch.float32, prefix="first_stage_model.")
    write_vae16(root / FLUX_CKPT, "flux", dtype=torch.float32, prefix="vae.")
    write_vae(root / SDXL, "sdxl", dtype=torch.float32)
    return root


@pytest.fixture(scope="module")
def service(root: Path):
    from luna_stack.devtools.embedded import EmbeddedService

    svc = EmbeddedService(build(make_settings(root, LUNA_VAE_MAX_DELAY_MS="1"))).start()
    svc.wait_ready()
    yield svc
    svc.stop()


def reference(path: Path, prefix: str, layout: str) -> AutoencoderKL:
    """The same weights through diffusers' own converter and the generator's config: independent of ours."""
    config = vae16_config("small")
    sd = load_state_dict(path, prefix=prefix)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(sd if layout == "diffusers" else convert_ldm_vae_checkpoint(sd, config), strict=True)
    return vae.eval()


def _latent(seed: int, b: int = 1, h: int = 8, w: int = 8, c: int = 16) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _image(seed: int, b: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FILES))
def test_decode_and_encode_equal_diffusers_in_process(service, root: Path, name: str) -> None:
    ref = reference(root / name, *FILES[name])
    latent, image = _latent(1, b=2), _image(2, 2, 64, 48)
    with Client("vae", url=service.url) as client, torch.inference_mode():
        out, params = client.call("decode", {"latent": latent}, {"model": name})
        assert params["model"] == name and out["image"].shape == (2, 64, 64, 3)
        expected = torch.clamp((ref.decode(latent).sample + 1) / 2, 0, 1).movedim(1, -1)
        assert torch.equal(out["image"], expected)

        enc, _ = client.call("encode", {"image": image}, {"model": name})
        assert enc["latent"].shape == (2, 16, 8, 6)
        assert torch.equal(enc["latent"], ref.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mode())
        # the round trip: encode's output decodes to an image of the input's size
        back, _ = client.call("decode", {"latent": enc["latent"]}, {"model": name})
        assert back["image"].shape == image.shape


def test_the_layouts_of_one_seed_are_one_model(service) -> None:
    # Flux's BFL file, SD3's diffusers file and the checkpoint parts hold the same weights (same seed).
    latent = _latent(3)
    with Client("vae", url=service.url) as client:
        images = [client.call("decode", {"latent": latent}, {"model": name})[0]["image"] for name in FILES]
    assert all(torch.equal(images[0], other) for other in images[1:])


def test_describe_reports_16_channels_and_family(service) -> None:
    with Client("vae", url=service.url) as client:
        described = {name: client.call("load", None, {"model": name})[1] for name in (*FILES, SDXL)}
    for name in FILES:
        assert described[name]["latent_channels"] == 16
        # Flux and SD3 VAEs are equal in every shape: without a diffusion model beside it, "16ch"
        assert described[name]["family"] == "16ch"
    assert (described[SDXL]["latent_channels"], described[SDXL]["family"]) == (4, "4ch")


def test_tiled_ops_equal_in_process_and_stay_close_to_untiled(service, root: Path) -> None:
    ref = reference(root / FLUX, *FILES[FLUX])
    latent, image = _latent(4, h=24, w=16), _image(5, 1, 96, 128)
    with Client("vae", url=service.url) as client, torch.inference_mode():
        tiling = {"tile_x": 16, "tile_y": 16, "overlap": 4}
        out, _ = client.call("decode_tiled", {"latent": latent}, {"model": FLUX, **tiling})
        raw = three_pass(
            latent,
            lambda z: ref.decode(z).sample,
            tile_y=16,
            tile_x=16,
            overlap=4,
            scale=8,
            out_channels=3,
            encode=False,
        )
        assert torch.equal(out["image"], torch.clamp((raw + 1) / 2, 0, 1).movedim(1, -1))
        plain, _ = client.call("decode", {"latent": latent}, {"model": FLUX})
        unrelated, _ = client.call("decode", {"latent": _latent(40, h=24, w=16)}, {"model": FLUX})
        tiled, whole, other = (t.flatten() for t in (out["image"], plain["image"], unrelated["image"]))
        assert not torch.equal(tiled, whole)  # there is real tiling
        # Random weights see far past a 128-pixel tile, so tiles differ from the whole image, yet the
        # tiled image is the same picture: measured correlation 0.95 with it, 0.06 between unrelated ones.
        assert torch.corrcoef(torch.stack([tiled, whole]))[0, 1] > 0.9
        assert (tiled - whole).abs().mean() < 0.3 * (other - whole).abs().mean()

        enc, _ = client.call("encode_tiled", {"image": image}, {"model": FLUX, "tile_x": 64, "overlap": 8})
        raw_latent = three_pass(
            image.movedim(-1, 1) * 2 - 1,
            lambda x: ref.encode(x).latent_dist.mode(),
            tile_y=64,
            tile_x=64,
            overlap=8,
            scale=1 / 8,
            out_channels=16,
            encode=True,
        )
        assert enc["latent"].shape == (1, 16, 12, 16) and torch.equal(enc["latent"], raw_latent)


@pytest.mark.parametrize(
    ("model", "channels", "op"),
    [(FLUX, 4, "decode"), (SD3, 4, "decode_tiled"), (SDXL, 16, "decode"), (SDXL, 16, "decode_tiled")],
)
def test_latent_of_the_other_channel_count_is_a_clear_4xx(
    service, model: str, channels: int, op: str
) -> None:
    want = 4 if channels == 16 else 16
    with Client("vae", url=service.url) as client:
        with pytest.raises(InvalidTensor) as info:
            client.call(op, {"latent": _latent(6, c=channels)}, {"model": model})
        assert info.value.status == 400
        assert f"decodes {want}-channel latents; this latent has {channels} channels" in info.value.message
        assert ("SD1.x / SDXL" if channels == 4 else "Flux / SD3") in (info.value.hint or "")
        ok, _ = client.call("decode", {"latent": _latent(6, c=want)}, {"model": model})
        assert ok["image"].shape == (1, 64, 64, 3)


def test_sdxl_and_flux_vaes_resident_at_once_by_name(root: Path, start_service) -> None:
    svc = start_service(build, make_settings(root, LUNA_VAE_PRELOAD=f"{SDXL},{FLUX}"))
    sdxl = load_vae("sdxl", root / SDXL, torch.device("cpu"), torch.float32)
    flux = load_vae("flux", root / FLUX, torch.device("cpu"), torch.float32)
    with Client("vae", url=svc.url) as client:
        resident = {m["name"]: m["latent_channels"] for m in client.status()["models"]}
        assert resident == {SDXL: 4, FLUX: 16}
        for _ in range(2):  # interleaved: neither request evicts or reloads the other model
            a, _ = client.call("decode", {"latent": _latent(7, c=4)}, {"model": SDXL})
            b, _ = client.call("decode", {"latent": _latent(7, c=16)}, {"model": FLUX})
            assert torch.equal(a["image"], sdxl.decode(_latent(7, c=4)))
            assert torch.equal(b["image"], flux.decode(_latent(7, c=16)))
        assert {m["name"] for m in client.status()["models"]} == {SDXL, FLUX}


def test_models_dir_holds_the_16_channel_vaes(models_dir: Path) -> None:
    for name, layout in ((FLUX, "ldm"), (SD3, "diffusers")):
        model = load_vae(name, models_dir / name, torch.device("cpu"), torch.float32)
        assert (model.latent_channels, model.family) == (16, "16ch")
        assert not model.vae.config.use_quant_conv and not model.vae.config.use_post_quant_conv
        keys = load_state_dict(models_dir / name)
        assert ("decoder.up.0.block.0.conv1.weight" in keys) == (layout == "ldm")


def test_pack_proxy_takes_its_latent_channels_from_the_service(service) -> None:
    from comfy_nodes.remote import Services
    from comfy_nodes.settings import PackSettings
    from comfy_nodes.vae_proxy import VaeProxy

    services = Services(PackSettings({"clip": None, "vae": service.url, "unet": None}, None, None))
    try:
        flux, sdxl = VaeProxy(services, FLUX), VaeProxy(services, SDXL)
        assert (flux.latent_channels, sdxl.latent_channels) == (16, 4)
        assert flux.downscale_ratio == flux.spacial_compression_decode() == 8
        latent = _latent(8)
        with Client("vae", url=service.url) as client:
            direct, _ = client.call("decode", {"latent": latent}, {"model": FLUX})
        assert torch.equal(flux.decode(latent), direct["image"])
        assert flux.encode(direct["image"]).shape == (1, 16, 8, 8)
    finally:
        services.close()


def test_a_vae_that_is_not_8x_is_refused_at_load(tmp_path: Path) -> None:
    # Three levels scale by 4 (SD's x4-upscaler VAE); the service's latents are 1/8 of the image.
    from safetensors.torch import save_file

    from luna_stack.weights.ldm_layout import vae_diffusers_to_ldm
    from luna_stack.wire.errors import ModelLoadError

    config = {**vae16_config("small"), "block_out_channels": [32, 32, 64]}
    config["down_block_types"], config["up_block_types"] = (
        config["down_block_types"][:3],
        config["up_block_types"][:3],
    )
    path = tmp_path / "x4.safetensors"
    save_file(vae_diffusers_to_ldm(AutoencoderKL(**config).state_dict()), str(path))
    with pytest.raises(ModelLoadError, match="scales images by 4, not 8"):
        load_vae("x4", path, torch.device("cpu"), torch.float32)
