"""Property-based fuzzing of every endpoint (hypothesis): no input may get a 5xx or hang, and after each
one a well-formed request must still succeed. Derandomized and bounded (max_examples, a per-request
timeout), so CI runs the same inputs every time in about a minute."""

from __future__ import annotations

import http.client
import json
import math
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from luna_stack.clip.family import build as build_clip
from luna_stack.unet.family import build as build_unet
from luna_stack.vae.family import build as build_vae
from luna_stack.wire import codec

from .conftest import make_settings

TIMEOUT_S = 30.0  # any answer slower than this counts as a hang
MODELS = {
    "vae": "vae/sd15-small-vae.safetensors",
    "unet": "checkpoints/sd15-small.safetensors",
    "clip": "checkpoints/sd15-small.safetensors",
}
OPS = {
    "vae": ["decode", "encode", "decode_tiled", "encode_tiled"],
    "unet": ["step"],
    "clip": ["encode", "encode_dual", "tokenize"],
}
TENSOR_NAMES = ["latent", "image", "x", "timesteps", "context", "y", "control.input.0", "control.output.2"]
PARAM_KEYS = [
    "model", "text", "text_l", "text_g", "tokens", "lora", "tile_x", "tile_y", "overlap", "request_id",
    "clip_skip", "positive", "negative", "control_lengths", "cache", "width", "crop_w", "name", "strength",
    "gpu_uuid", "handle", "nbytes", "pid", "_ipc",
]  # fmt: skip

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from([*MODELS.values(), "../../etc/passwd", "/etc/passwd", "x" * 300, "a+b"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(PARAM_KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 77]), max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]))
    if math.prod(shape) > 1 << 16:
        shape = shape[:2]
    fill = draw(st.sampled_from([0.0, 1.0, -3.0, float("nan"), float("inf")]))
    t = torch.full(shape, fill) if dtype.is_floating_point else torch.zeros(shape)
    return t.to(dtype)


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> tuple[bytes, str]:
    form = draw(st.sampled_from(["blob", "blob", "blob", "json", "bytes"]))
    if form == "bytes":
        return draw(st.binary(max_size=200)), draw(st.sampled_from([codec.CONTENT_TYPE, "application/json"]))
    params = draw(st.dictionaries(st.sampled_from(PARAM_KEYS), json_values, max_size=6))
    if draw(st.booleans()):
        params["model"] = MODELS[kind]
    if form == "json":
        return json.dumps(params).encode(), "application/json"
    named = draw(st.dictionaries(st.sampled_from(TENSOR_NAMES), tensors(), max_size=4))
    try:
        return save(named, metadata={codec.PARAMS_KEY: json.dumps(params)}), codec.CONTENT_TYPE
    except Exception:  # safetensors refuses some shapes itself; the body is then just params
        return codec.encode({}, params), codec.CONTENT_TYPE


def _request(url: str, method: str, path: str, body: bytes | None = None, ctype: str = "") -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def services(models_dir: Path):
    from luna_stack.devtools.embedded import EmbeddedService

    built = {"vae": build_vae, "unet": build_unet, "clip": build_clip}
    running = {k: EmbeddedService(b(make_settings(models_dir))).start() for k, b in built.items()}
    for svc in running.values():
        svc.wait_ready()
    yield {k: svc.url for k, svc in running.items()}
    for svc in running.values():
        svc.stop()


def _still_serves(url: str) -> None:
    body = codec.encode({"latent": torch.randn(1, 4, 8, 8)}, {"model": MODELS["vae"]})
    status, raw = _request(url, "POST", "/v1/vae/decode", body, codec.CONTENT_TYPE)
    assert status == 200, raw[:300]
    tensors_out, _ = codec.decode(raw)
    assert tensors_out["image"].shape == (1, 64, 64, 3)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str, bytes, str]:
    kind = draw(st.sampled_from(sorted(OPS)))
    op = draw(st.sampled_from([*OPS[kind], "nope"]))
    path = draw(
        st.sampled_from(
            [f"/v1/{kind}/{op}"] * 4
            + [f"/v1/{kind}/load", f"/v1/{kind}/unload", f"/v1/{kind}/jobs/{op}", "/v1/ipc/buffers"]
        )
    )
    body, ctype = draw(bodies(kind))
    return kind, "POST", path, body, ctype


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(request=requests())
def test_no_input_gets_a_5xx_and_the_service_stays_up(services, request) -> None:
    kind, method, path, body, ctype = request
    status, raw = _request(services[kind], method, path, body, ctype)
    assert status < 500, (path, raw[:400])
    if status >= 400:
        error = json.loads(raw)["error"]  # a JSON error body with a message, never a stack trace
        assert error["code"] and error["message"]
    _still_serves(services["vae"])


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.text(st.characters(codec="ascii", exclude_characters="/?#%"), max_size=80),
    method=st.sampled_from(["GET", "DELETE", "POST"]),
    prefix=st.sampled_from(["/v1/jobs/", "/v1/progress/", "/v1/ipc/buffers/", "/v1/vae/models/", "/v1/"]),
)
def test_no_path_gets_a_5xx(services, path: str, method: str, prefix: str) -> None:
    status, raw = _request(services["vae"], method, prefix + urllib.parse.quote(path))
    assert status < 500, (prefix, path, raw[:300])
