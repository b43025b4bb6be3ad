"""The 16-channel VAEs against real ComfyUI: the same full-size files (Flux's ae.safetensors in BFL naming,
SD3's VAE in diffusers naming) through ComfyUI's own loading (comfy.sd.VAE(sd=...)) and through the VAE
service, by way of the pack's Shared VAE Loader and ComfyUI's own VAEDecode / VAEEncode / tiled nodes.

Full size because comfy.sd.VAE builds the SD VAE's widths (128 x 1-2-4-4) whatever the file holds and
reads only the latent channels from it. The harness is tests/comfyui_harness.py (the `comfy` fixture: the
pack is loaded into ComfyUI once, and only that copy may be used in this process). Needs COMFYUI_PATH;
see docs/comfyui.md.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from luna_stack.devtools.fixtures_vae16 import write_vae16

from .comfyui_harness import ComfyRuntime, pack_module, requires_comfyui, unload

pytestmark = requires_comfyui
FILES = {  # ComfyUI's vae/ name -> how the file is written
    "flux-full-ae.safetensors": {"family": "flux", "layout": "ldm", "seed": 1},
    "sd3-full-vae.safetensors": {"family": "sd3", "layout": "diffusers", "seed": 2},
}
# max |ComfyUI - service| over the image (0..1) / over the latent, fp32 on the CPU: ComfyUI's Encoder /
# Decoder modules vs diffusers' AutoencoderKL, float rounding only. Measured (pytest -s prints it):
# <= 1.5e-6 for decode and encode, tiled or not.
IMAGE_ATOL = 1e-5
LATENT_ATOL = 1e-5


@pytest.fixture(scope="module")
def runtime(comfy: ComfyRuntime) -> Any:
    """ComfyUI's nodes, and for each file ComfyUI's own VAE and the pack's Shared VAE Loader's VAE."""
    comfy_sd, comfy_utils = (importlib.import_module(m) for m in ("comfy.sd", "comfy.utils"))
    folder = comfy.models / "vae"  # the folder ComfyUI and the services share
    for name, how in FILES.items():
        write_vae16(folder / name, how["family"], "full", seed=how["seed"], layout=how["layout"])
    local = {
        name: comfy_sd.VAE(sd=comfy_utils.load_torch_file(str(folder / name)), dtype=torch.float32)
        for name in FILES
    }
    shared = {name: pack_module("nodes").SharedVAELoader().load(name)[0] for name in FILES}
    yield comfy.nodes, local, shared
    for proxy in shared.values():
        unload(proxy.model, ("VAE",))
    for name in FILES:
        (folder / name).unlink()


def _report(what: str, err: float) -> None:
    print(f"\nmax |ComfyUI - service| {what}: {err:.3g}")


@pytest.mark.parametrize("name", sorted(FILES))
def test_proxy_reports_what_comfyui_reads_from_the_file(runtime, name: str) -> None:
    _, local, shared = runtime
    proxy, vae = shared[name], local[name]
    assert vae.latent_channels == 16 and proxy.latent_channels == 16
    for attr in ("downscale_ratio", "upscale_ratio", "latent_dim", "output_channels"):
        assert getattr(proxy, attr) == getattr(vae, attr), attr
    assert proxy.spacial_compression_encode() == vae.spacial_compression_encode() == 8
    assert proxy.spacial_compression_decode() == vae.spacial_compression_decode() == 8
    assert proxy.temporal_compression_decode() is vae.temporal_compression_decode() is None


@pytest.mark.parametrize("name", sorted(FILES))
@torch.inference_mode()  # as ComfyUI's executor runs nodes
def test_decode_and_encode_equal_comfyui(runtime, name: str) -> None:
    nodes, local, shared = runtime
    g = torch.Generator().manual_seed(3)
    # EmptySD3LatentImage's shape; raw latents (the latent format's scale/shift is the model's business)
    samples = {"samples": torch.randn(1, 16, 8, 12, generator=g) * 2}
    pixels = torch.rand(1, 68, 90, 3, generator=g)  # not multiples of 8: both crop to the centre
    decode, encode = nodes.VAEDecode(), nodes.VAEEncode()

    ours, theirs = (decode.decode(vae, samples)[0] for vae in (shared[name], local[name]))
    assert ours.shape == theirs.shape == (1, 64, 96, 3)
    err = (ours - theirs).abs().max().item()
    _report(f"{name} decode", err)
    assert err < IMAGE_ATOL

    ours, theirs = (encode.encode(vae, pixels)[0]["samples"] for vae in (shared[name], local[name]))
    assert ours.shape == theirs.shape == (1, 16, 8, 11)
    err = (ours - theirs).abs().max().item()
    _report(f"{name} encode", err)
    assert err < LATENT_ATOL


@torch.inference_mode()
def test_tiled_nodes_equal_comfyui(runtime) -> None:
    nodes, local, shared = runtime
    name = "flux-full-ae.safetensors"
    g = torch.Generator().manual_seed(4)
    samples = {"samples": torch.randn(1, 16, 16, 24, generator=g)}
    pixels = torch.rand(1, 128, 192, 3, generator=g)
    ours, theirs = (
        nodes.VAEDecodeTiled().decode(vae, samples, tile_size=64, overlap=16)[0]
        for vae in (shared[name], local[name])
    )
    err = (ours - theirs).abs().max().item()
    _report("tiled decode", err)
    assert ours.shape == (1, 128, 192, 3) and err < IMAGE_ATOL
    ours, theirs = (
        nodes.VAEEncodeTiled().encode(vae, pixels, tile_size=64, overlap=16)[0]["samples"]
        for vae in (shared[name], local[name])
    )
    err = (ours - theirs).abs().max().item()
    _report("tiled encode", err)
    assert ours.shape == (1, 16, 16, 24) and err < LATENT_ATOL


def test_a_4_channel_latent_is_refused_in_one_sentence(runtime) -> None:
    _, _, shared = runtime
    error = pack_module("errors").LunaStackError
    with pytest.raises(error, match="decodes 16-channel latents; this latent has 4 channels"):
        shared["flux-full-ae.safetensors"].decode(torch.zeros(1, 4, 8, 8))
