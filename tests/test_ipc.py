"""CUDA IPC parts that run without a GPU: where inputs are viewed and outputs placed in a buffer, and the
service's answers when IPC cannot apply. The GPU round trips are in test_ipc_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

from luna_stack.client.http import AsyncClient
from luna_stack.server.ipc import IpcSink, _event_handle, _view
from luna_stack.vae.family import build as build_vae
from luna_stack.wire import codec
from luna_stack.wire.errors import BadRequest, IpcUnavailable
from luna_stack.wire.ipc import ALIGN, process_started

from .conftest import make_settings

VAE = "vae/sd15-small-vae.safetensors"


def test_sink_places_outputs_aligned_and_sends_what_does_not_fit_to_the_host() -> None:
    memory = torch.full((4096,), 255, dtype=torch.uint8)
    sink = IpcSink(memory)
    a = torch.randn(3, 5)  # 60 bytes
    b = torch.arange(7, dtype=torch.int64)
    big = torch.randn(1024)  # 4 KiB: does not fit after the others
    assert sink.put("a", a).data_ptr() == memory.data_ptr()
    placed_b = sink.put("b", b)
    assert placed_b.data_ptr() == memory.data_ptr() + ALIGN and torch.equal(placed_b, b)
    host = sink.put("big", big)
    assert host.device.type == "cpu" and torch.equal(host, big)
    assert sink.reply() == {
        "outputs": {"a": [0, "fp32", [3, 5]], "b": [ALIGN, "int64", [7]]},
        "needed": 2 * ALIGN + 4096,
    }
    # A batch that failed merged is retried per request: the same output lands in the same place.
    again = sink.put("a", a * 2)
    assert again.data_ptr() == memory.data_ptr() and torch.equal(again, a * 2)
    assert sink.needed == 2 * ALIGN + 4096


@pytest.mark.parametrize(
    ("offset", "dtype", "shape", "message"),
    [
        (0, "fp32", [1, 4, 64, 64], "run past the buffer"),
        (8, "fp32", [2, 2], "multiple of 256"),
        (-256, "fp32", [2], "non-negative"),
        (0, "object", [2], "dtype"),
        (0, "fp16", [2, -1], "shape"),
        (0, "fp16", "2x2", "shape"),
        ("0", "fp16", [2], "offset"),
    ],
)
def test_bad_input_places_are_rejected(offset, dtype, shape, message) -> None:
    memory = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(BadRequest, match=message):
        _view(memory, "x", offset, dtype, shape)


def test_input_views_alias_the_buffer() -> None:
    memory = torch.zeros(4096, dtype=torch.uint8)
    view = _view(memory, "x", 512, "fp16", [2, 3])
    view.fill_(1.5)
    assert view.data_ptr() == memory.data_ptr() + 512
    assert torch.equal(memory[512:524].view(torch.float16), torch.full((6,), 1.5, dtype=torch.float16))


def test_process_start_time_identifies_a_live_process() -> None:
    assert process_started(os.getpid()) == process_started(os.getpid()) is not None
    assert process_started(2**22 + 12345) is None  # beyond pid_max: no such process


async def test_a_cpu_service_refuses_ipc_clearly_and_keeps_serving(models_dir, start_service) -> None:
    svc = start_service(build_vae, make_settings(models_dir))
    async with AsyncClient("vae", url=svc.url) as client:
        status = await client.status()
        assert status["ipc"]["enabled"] is False
        with pytest.raises(IpcUnavailable, match="not a GPU"):
            await client._json_call("POST", "/v1/ipc/buffers", {"gpu_uuid": None, "handle": "00" * 64})
        with pytest.raises(IpcUnavailable, match="not a GPU"):
            await client._http_call("decode", {}, {"model": VAE, "_ipc": {"inputs": {}, "out": "x"}})
        with pytest.raises(BadRequest, match="queued jobs cannot use CUDA IPC"):
            blob = codec.encode({}, {"model": VAE, "_ipc": {"out": "x"}})
            await client._request("POST", "/v1/vae/jobs/decode", data=blob)
        latent = torch.randn(1, 4, 8, 8)
        out, _ = await client.call("decode", {"latent": latent}, {"model": VAE})
        assert out["image"].shape == (1, 64, 64, 3)
        session = await client._http()
        async with session.get(svc.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'luna_op_transport_total{transport="ipc"} 1.0' in metrics  # the refused one
    assert 'luna_op_transport_total{transport="http"} 1.0' in metrics


def test_client_ipc_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="auto' or 'off"):
        AsyncClient("vae", url="http://127.0.0.1:1", ipc="sometimes")


@pytest.mark.parametrize(
    ("value", "message"),
    [("zz" * 64, "hex of a CUDA IPC event handle"), ("ab" * 10, "64 bytes, got 10"), (7, "hex")],
)
def test_a_bad_ready_event_handle_is_a_400(value, message) -> None:
    """A buffer registration's `ready_event` is checked before any CUDA call opens it."""
    with pytest.raises(BadRequest, match=message):
        _event_handle(value)
    assert _event_handle(None) is None and _event_handle("ab" * 64) == bytes.fromhex("ab" * 64)
