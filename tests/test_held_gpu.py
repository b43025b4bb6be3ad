"""Held tensors on a GPU service (make test-gpu): through CUDA IPC a referred tensor is not written into
the exchange buffer and the kept copy survives the buffer's reuse; over HTTP the kept tensors live on
the GPU next to host inputs. Outputs bitwise those of full sends."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from luna_stack.client.http import AsyncClient

from .test_held import KEEP, SDXL, sdxl_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = {"LUNA_DEVICE": "cuda:0", "LUNA_DTYPE": "fp32", "LUNA_UNET_BATCHING": "false"}


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as resp:
        return json.load(resp)


async def test_held_tensors_over_ipc_and_http_on_a_gpu(models_dir: Path, serve_process) -> None:
    unet = serve_process("unet", models_dir, **GPU)
    first, other = sdxl_inputs(0), {**sdxl_inputs(1), "context": sdxl_inputs(0)["context"] * 3}
    async with (
        AsyncClient("unet", url=unet.url, name="ipc") as ipc,
        AsyncClient("unet", url=unet.url, name="http", ipc="off") as http,
    ):
        expected, _ = await http.call("step", first, {"model": SDXL})
        on_gpu = {k: t.cuda() for k, t in first.items()}
        out, _ = await ipc.call("step", on_gpu, {"model": SDXL}, keep=KEEP)  # kept from the IPC buffer
        # A full send of another context overwrites the input buffer where the kept one lay.
        await ipc.call("step", {k: t.cuda() for k, t in other.items()}, {"model": SDXL})
        again, _ = await ipc.call("step", on_gpu, {"model": SDXL}, keep=KEEP)  # a reference
        assert torch.equal(out["out"].cpu(), expected["out"]) and torch.equal(again["out"], out["out"])
        assert ipc.held.counts.referred == 2 and ipc.ipc.calls == 3
        for _ in range(2):  # over HTTP: x on the host, context and y held on the GPU
            held_http, _ = await http.call("step", first, {"model": SDXL}, keep=KEEP)
            assert torch.equal(held_http["out"], expected["out"])
        assert http.held.counts.referred == 2
    held = status(unet.url)["held"]
    assert held["hits"] == 4 and held["entries"] == 4 and held["clients"] == 2
