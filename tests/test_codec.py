"""Wire codec: round trips of every dtype we send, and rejection of broken bodies."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from luna_stack.wire import codec
from luna_stack.wire.errors import InvalidBody


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64])
def test_round_trip_each_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    src = (torch.rand(2, 3, 5, 7, generator=gen) * 200).to(dtype)
    tensors, params = codec.decode(codec.encode({"x": src}, {"model": "a.safetensors", "n": 3}))
    assert tensors["x"].dtype == dtype
    assert torch.equal(tensors["x"], src)
    assert params == {"model": "a.safetensors", "n": 3}


def test_empty_tensor_and_no_params() -> None:
    tensors, params = codec.decode(codec.encode({"e": torch.empty(0, 4)}))
    assert tensors["e"].shape == (0, 4)
    assert params == {}


def test_large_tensor_round_trip() -> None:
    # A 1024² SDXL image as fp32 is 12 MiB; send 64 MiB to be sure nothing caps it.
    src = torch.arange(16 * 1024 * 1024, dtype=torch.float32)
    tensors, _ = codec.decode(codec.encode({"big": src}))
    assert torch.equal(tensors["big"], src)


def test_non_contiguous_tensors_are_sent_as_their_values() -> None:
    src = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    tensors, _ = codec.decode(codec.encode({"t": src}))
    assert torch.equal(tensors["t"], src)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01\x00",
        struct.pack("<Q", 1 << 40) + b"{}",  # header longer than the body
        struct.pack("<Q", 5) + b"nope!",  # header not JSON
        struct.pack("<Q", 2) + b"[]",  # header not an object
    ],
)
def test_corrupt_bodies_are_rejected(blob: bytes) -> None:
    with pytest.raises(InvalidBody):
        codec.decode(blob)


def test_truncated_body_is_rejected() -> None:
    blob = codec.encode({"x": torch.ones(64, 64)})
    with pytest.raises(InvalidBody):
        codec.decode(blob[:-100])


def test_header_pointing_past_the_data_is_rejected() -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    with pytest.raises(InvalidBody):
        codec.decode(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def test_params_must_be_a_json_object() -> None:
    header = json.dumps({"__metadata__": {"luna": "[1, 2]"}}).encode()
    with pytest.raises(InvalidBody, match="JSON object"):
        codec.decode(struct.pack("<Q", len(header)) + header)


def test_views_of_one_tensor_are_sent_as_independent_tensors() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors, _ = codec.decode(codec.encode({"a": base[0], "b": base[1:], "c": base, "d": base}))
    assert torch.equal(tensors["a"], base[0]) and torch.equal(tensors["b"], base[1:])
    assert torch.equal(tensors["c"], base) and torch.equal(tensors["d"], base)


def test_params_only_body_is_a_plain_safetensors_header() -> None:
    """IPC requests and replies carry params only: the blob is the header alone, which safetensors itself
    reads as an empty file, and bytes after it are refused as before."""
    from safetensors.torch import load

    blob = codec.encode({}, {"model": "unet/x.safetensors", "lora": [], "note": "é"})
    assert load(blob) == {}
    assert len(blob) % 8 == 0
    assert codec.decode(blob) == ({}, {"model": "unet/x.safetensors", "lora": [], "note": "é"})
    with pytest.raises(InvalidBody, match="malformed safetensors"):
        codec.decode(blob + b"junk")
