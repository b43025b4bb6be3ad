"""The VAE service against the same weights run in-process with diffusers' own loader, plus bad input."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from luna_stack.client.http import AsyncClient, Client
from luna_stack.devtools.fixtures import vae_config
from luna_stack.vae.family import build
from luna_stack.vae.tiling import three_pass
from luna_stack.weights.checkpoint import load_state_dict
from luna_stack.wire import codec
from luna_stack.wire.errors import (
    BadRequest,
    InvalidBody,
    InvalidTensor,
    PathNotAllowed,
    PayloadTooLarge,
    Unauthorized,
    UnknownModel,
)

from .conftest import make_settings

# (model name the service is asked for, file, prefix of the VAE inside it)
LAYOUTS = {
    "sd15-standalone": ("vae/sd15-small-vae.safetensors", ""),
    "sdxl-checkpoint": ("checkpoints/sdxl-small.safetensors", "first_stage_model."),
}


def reference_vae(path: Path, prefix: str) -> AutoencoderKL:
    """The same weights through diffusers' own converter and the generator's config: independent of ours."""
    config = vae_config("small")
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_state_dict(path, prefix=prefix), config), strict=True)
    return vae.eval()


@pytest.fixture(scope="module")
def vae_service(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from luna_stack.devtools.embedded import EmbeddedService

    svc = EmbeddedService(build(make_settings(models_dir, LUNA_VAE_MAX_DELAY_MS="1"))).start()
    svc.wait_ready()
    yield svc
    svc.stop()


def _latent(seed: int, b: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_decode_and_encode_equal_in_process(vae_service, models_dir: Path, layout: str) -> None:
    name, prefix = LAYOUTS[layout]
    ref = reference_vae(models_dir / name, prefix)
    latent = _latent(1, b=2)
    image = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(2))
    with Client("vae", url=vae_service.url) as client, torch.inference_mode():
        out, params = client.call("decode", {"latent": latent}, {"model": name})
        expected = torch.clamp((ref.decode(latent).sample.float() + 1) / 2, 0, 1).movedim(1, -1)
        assert params["model"] == name
        assert out["image"].shape == (2, 64, 64, 3) and out["image"].dtype == torch.float32
        assert torch.equal(out["image"], expected)

        enc, _ = client.call("encode", {"image": image}, {"model": name})
        expected_latent = ref.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        assert enc["latent"].shape == (2, 4, 8, 6)
        assert torch.equal(enc["latent"], expected_latent)


def test_tiled_ops_equal_in_process(vae_service, models_dir: Path) -> None:
    name, prefix = LAYOUTS["sdxl-checkpoint"]
    ref = reference_vae(models_dir / name, prefix)
    latent = _latent(3, h=24, w=16)
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(4))
    with Client("vae", url=vae_service.url) as client, torch.inference_mode():
        out, _ = client.call(
            "decode_tiled", {"latent": latent}, {"model": name, "tile_x": 8, "tile_y": 8, "overlap": 2}
        )
        raw = three_pass(
            latent,
            lambda z: ref.decode(z).sample.float(),
            tile_y=8,
            tile_x=8,
            overlap=2,
            scale=8,
            out_channels=3,
            encode=False,
        )
        assert torch.equal(out["image"], torch.clamp((raw + 1) / 2, 0, 1).movedim(1, -1))
        # Tiles must differ from a plain decode (there is real tiling) yet stay close to it.
        plain, _ = client.call("decode", {"latent": latent}, {"model": name})
        assert not torch.equal(out["image"], plain["image"])

        enc, _ = client.call("encode_tiled", {"image": image}, {"model": name, "tile_x": 64, "overlap": 8})
        pixels = image.movedim(-1, 1) * 2 - 1
        raw_latent = three_pass(
            pixels,
            lambda x: ref.encode(x).latent_dist.mode(),
            tile_y=64,
            tile_x=64,
            overlap=8,
            scale=1 / 8,
            out_channels=4,
            encode=True,
        )
        assert torch.equal(enc["latent"], raw_latent)


def test_tiling_blends_seams_exactly_for_a_position_independent_function() -> None:
    # For a function that treats every pixel alike, blended tiles must reproduce the untiled result.
    x = torch.rand(2, 4, 20, 28, generator=torch.Generator().manual_seed(5))

    def up(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(t[:, :3] * 2 - 1, scale_factor=8, mode="nearest")

    tiled = three_pass(x, up, tile_y=8, tile_x=8, overlap=2, scale=8, out_channels=3, encode=False)
    torch.testing.assert_close(tiled, up(x), rtol=1e-5, atol=1e-5)


def test_encode_crops_to_multiples_of_eight_like_comfyui(vae_service, models_dir: Path) -> None:
    name, prefix = LAYOUTS["sd15-standalone"]
    ref = reference_vae(models_dir / name, prefix)
    image = torch.rand(1, 70, 53, 4, generator=torch.Generator().manual_seed(6))  # RGBA, odd sizes
    with Client("vae", url=vae_service.url) as client, torch.inference_mode():
        enc, _ = client.call("encode", {"image": image}, {"model": name})
        cropped = image[:, 3:67, 2:50, :3]
        expected = ref.encode(cropped.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        assert torch.equal(enc["latent"], expected)


async def test_concurrent_requests_batch_and_each_gets_its_own_rows(models_dir: Path, start_service) -> None:
    svc = start_service(build, make_settings(models_dir, LUNA_VAE_MAX_DELAY_MS="300", LUNA_VAE_MAX_BATCH="8"))
    name = LAYOUTS["sd15-standalone"][0]
    latents = [_latent(10 + i, b=1 + i % 2) for i in range(6)]
    clients = [AsyncClient("vae", url=svc.url, name=f"c{i}") for i in range(6)]
    try:
        singles = [
            (await clients[0].call("decode", {"latent": z}, {"model": name}))[0]["image"] for z in latents
        ]
        before = svc.service.batcher.batches
        results = await asyncio.gather(
            *(c.call("decode", {"latent": z}, {"model": name}) for c, z in zip(clients, latents, strict=True))
        )
        merged_batches = svc.service.batcher.batches - before
    finally:
        for c in clients:
            await c.close()
    for (out, _), single in zip(results, singles, strict=True):
        torch.testing.assert_close(out["image"], single, rtol=0, atol=1e-5)
    assert merged_batches < len(latents), (
        f"{len(latents)} concurrent requests ran as {merged_batches} batches"
    )
    assert svc.service.batcher.largest_batch >= 3


def test_status_health_and_metrics(vae_service) -> None:
    with Client("vae", url=vae_service.url) as client:
        client.call("decode", {"latent": _latent(0)}, {"model": LAYOUTS["sd15-standalone"][0]})
        status = client.status()
        models = client.get_json("/v1/vae/models")
    assert status["service"] == "vae" and status["ready"] is True
    assert status["gpu"]["available"] is False and "no GPU" in status["gpu"]["reason"]
    assert status["device"] == "cpu" and status["dtype"] == "fp32"
    loaded = {m["name"]: m for m in status["models"]}
    assert loaded["vae/sd15-small-vae.safetensors"]["bytes"] > 1_000_000
    assert status["requests"]["ok"] >= 1
    assert "checkpoints/sdxl-small.safetensors" in models["available"]
    with urllib.request.urlopen(vae_service.url + "/metrics") as resp:
        text = resp.read().decode()
    assert 'luna_requests_total{code="ok",outcome="ok",route="/v1/vae/{op}"}' in text
    assert (
        "luna_batch_rows_bucket" in text
        and 'luna_model_bytes{model="vae/sd15-small-vae.safetensors"}' in text
    )
    with urllib.request.urlopen(vae_service.url + "/health/live") as resp:
        assert json.loads(resp.read()) == {"live": True}


def _post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": codec.CONTENT_TYPE, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


BAD_INPUTS = [
    ("malformed safetensors", None, InvalidBody),
    ("latent of rank 3", ({"latent": torch.randn(4, 8, 8)}, {}), InvalidTensor),
    ("3 latent channels", ({"latent": torch.randn(1, 3, 8, 8)}, {}), InvalidTensor),
    ("NaN in latent", ({"latent": torch.full((1, 4, 8, 8), float("nan"))}, {}), InvalidTensor),
    ("inf in image", ({"image": torch.full((1, 16, 16, 3), float("inf"))}, {"op": "encode"}), InvalidTensor),
    ("int latent", ({"latent": torch.ones(1, 4, 8, 8, dtype=torch.int64)}, {}), InvalidTensor),
    ("missing tensor", ({"lat": torch.randn(1, 4, 8, 8)}, {}), BadRequest),
    ("unknown model", ({"latent": torch.randn(1, 4, 8, 8)}, {"model": "nope.safetensors"}), UnknownModel),
    (
        "path outside roots",
        ({"latent": torch.randn(1, 4, 8, 8)}, {"model": "../../etc/passwd"}),
        PathNotAllowed,
    ),
    ("absolute path", ({"latent": torch.randn(1, 4, 8, 8)}, {"model": "/etc/passwd"}), PathNotAllowed),
    ("not a VAE", ({"latent": torch.randn(1, 4, 8, 8)}, {"model": "unet/sd15-small-unet.safetensors"}), None),
    (
        "bad tiling",
        ({"latent": torch.randn(1, 4, 8, 8)}, {"op": "decode_tiled", "tile_x": 8, "overlap": 6}),
        BadRequest,
    ),
]


@pytest.mark.parametrize(("label", "request_", "error"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_and_the_service_stays_up(vae_service, label, request_, error) -> None:
    good = LAYOUTS["sd15-standalone"][0]
    with Client("vae", url=vae_service.url) as client:
        if request_ is None:
            status, body = _post_raw(
                vae_service.url + "/v1/vae/decode", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"
            )
            assert status == 400 and body["error"]["code"] == "invalid_body"
        else:
            tensors, params = request_
            op = params.pop("op", "decode")
            params.setdefault("model", good)
            with pytest.raises(BadRequest.__mro__[1]) as info:  # every service error is a LunaError
                client.call(op, tensors, params)
            assert 400 <= info.value.status < 500, info.value
            if error is not None:
                assert isinstance(info.value, error), info.value
            assert info.value.message
        out, _ = client.call("decode", {"latent": _latent(0)}, {"model": good})
        assert out["image"].shape == (1, 64, 64, 3)


def test_body_over_the_limit_is_413(models_dir: Path, start_service) -> None:
    svc = start_service(build, make_settings(models_dir, LUNA_MAX_BODY_MB="0.01"))
    with Client("vae", url=svc.url) as client:
        with pytest.raises(PayloadTooLarge):
            client.call(
                "decode", {"latent": torch.randn(1, 4, 64, 64)}, {"model": LAYOUTS["sd15-standalone"][0]}
            )
        out, _ = client.call("decode", {"latent": _latent(0)}, {"model": LAYOUTS["sd15-standalone"][0]})
    assert out["image"].shape == (1, 64, 64, 3)


def test_bearer_token(models_dir: Path, start_service) -> None:
    svc = start_service(build, make_settings(models_dir, LUNA_TOKEN="s3cret"))
    name = LAYOUTS["sd15-standalone"][0]
    with (
        Client("vae", url=svc.url, token="") as anonymous,
        pytest.raises(Unauthorized, match="requires a bearer"),
    ):
        anonymous.call("decode", {"latent": _latent(0)}, {"model": name})
    with Client("vae", url=svc.url, token="wrong") as wrong, pytest.raises(Unauthorized, match="wrong"):
        wrong.status()
    with Client("vae", url=svc.url, token="s3cret") as ok:
        assert ok.call("decode", {"latent": _latent(0)}, {"model": name})[0]["image"].shape == (1, 64, 64, 3)
    with urllib.request.urlopen(svc.url + "/health/ready") as resp:  # probes need no token
        assert resp.status == 200


def test_unload_and_preload(models_dir: Path, start_service) -> None:
    name = LAYOUTS["sd15-standalone"][0]
    svc = start_service(
        build, make_settings(models_dir, LUNA_VAE_PRELOAD=name, LUNA_VAE_LOAD_ON_DEMAND="false")
    )
    with Client("vae", url=svc.url) as client:
        assert [m["name"] for m in client.status()["models"]] == [name]
        with pytest.raises(UnknownModel, match="load_on_demand is off"):
            client.call("decode", {"latent": _latent(0)}, {"model": LAYOUTS["sdxl-checkpoint"][0]})
        req = urllib.request.Request(
            svc.url + "/v1/vae/unload",
            data=json.dumps({"model": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req) as resp:
            assert json.loads(resp.read())["unloaded"] is True
        assert client.status()["models"] == []
        # The same through the client (safetensors in and out), as comfy_nodes calls it.
        _, described = client.call("load", None, {"model": name})
        assert described["name"] == name and described["bytes"] > 0
        _, reply = client.call("unload", None, {"model": name})
        assert reply == {"model": name, "unloaded": True}
        with pytest.raises(BadRequest, match="model"):
            client.call("unload", None, {})
