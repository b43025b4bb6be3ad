"""Tiled VAE encode/decode with feathered seams, following ComfyUI's algorithm so results match it.

Each tile is run through the model, weighted by a mask that ramps linearly over the overlap, and the
weighted sum is divided by the summed masks. Like ComfyUI's VAEDecodeTiled / VAEEncodeTiled, three
tilings (tile, tile/2 × 2·tile, 2·tile × tile/2) are averaged, which hides seams of any one tiling.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

TileFn = Callable[[torch.Tensor], torch.Tensor]


def tile_count(height: int, width: int, tile_y: int, tile_x: int, overlap: int) -> int:
    rows = 1 if height <= tile_y else math.ceil((height - overlap) / (tile_y - overlap))
    cols = 1 if width <= tile_x else math.ceil((width - overlap) / (tile_x - overlap))
    return rows * cols


def _feather_mask(shape: torch.Size, feather: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(shape, device=device)
    for dim in (2, 3):
        if feather >= mask.shape[dim]:
            continue
        for t in range(feather):
            a = (t + 1) / feather
            mask.narrow(dim, t, 1).mul_(a)
            mask.narrow(dim, mask.shape[dim] - 1 - t, 1).mul_(a)
    return mask


def tiled_apply(
    samples: torch.Tensor,
    fn: TileFn,
    *,
    tile_y: int,
    tile_x: int,
    overlap: int,
    scale: float,
    out_channels: int,
    on_tile: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` (which scales spatial size by `scale`) tile by tile over NCHW `samples`, on its device."""
    out_hw = [round(s * scale) for s in samples.shape[2:]]
    output = torch.empty([samples.shape[0], out_channels, *out_hw], device=samples.device)
    tile = (tile_y, tile_x)
    for b in range(samples.shape[0]):
        s = samples[b : b + 1]
        if all(s.shape[d + 2] <= tile[d] for d in range(2)):
            output[b : b + 1] = fn(s)
            if on_tile:
                on_tile()
            continue
        acc = torch.zeros([1, out_channels, *out_hw], device=samples.device)
        weight = torch.zeros_like(acc)
        positions = [
            range(0, s.shape[d + 2] - overlap, tile[d] - overlap) if s.shape[d + 2] > tile[d] else [0]
            for d in range(2)
        ]
        for it in itertools.product(*positions):
            part = s
            origin = []
            for d in range(2):
                pos = max(0, min(s.shape[d + 2] - overlap, it[d]))
                length = min(tile[d], s.shape[d + 2] - pos)
                part = part.narrow(d + 2, pos, length)
                origin.append(round(pos * scale))
            out = fn(part)
            mask = _feather_mask(out.shape, round(overlap * scale), out.device)
            acc[:, :, origin[0] : origin[0] + out.shape[2], origin[1] : origin[1] + out.shape[3]] += (
                out * mask
            )
            weight[:, :, origin[0] : origin[0] + out.shape[2], origin[1] : origin[1] + out.shape[3]] += mask
            if on_tile:
                on_tile()
        output[b : b + 1] = acc / weight
    return output


def _shapes(tile_y: int, tile_x: int, encode: bool) -> list[tuple[int, int]]:
    # (tile_y, tile_x) in ComfyUI's summation order, so float rounding matches too.
    if encode:
        return [(tile_y, tile_x), (tile_y // 2, tile_x * 2), (tile_y * 2, tile_x // 2)]
    return [(tile_y * 2, tile_x // 2), (tile_y // 2, tile_x * 2), (tile_y, tile_x)]


def three_pass(
    samples: torch.Tensor,
    fn: TileFn,
    *,
    tile_y: int,
    tile_x: int,
    overlap: int,
    scale: float,
    out_channels: int,
    encode: bool,
    on_tile: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Average of three tilings: tile, (tile_y/2 × 2·tile_x) and (2·tile_y × tile_x/2), in input units."""
    total = None
    for ty, tx in _shapes(tile_y, tile_x, encode):
        part = tiled_apply(
            samples,
            fn,
            tile_y=ty,
            tile_x=tx,
            overlap=overlap,
            scale=scale,
            out_channels=out_channels,
            on_tile=on_tile,
        )
        total = part if total is None else total + part
    assert total is not None
    return total / 3.0


def three_pass_tiles(height: int, width: int, tile_y: int, tile_x: int, overlap: int, encode: bool) -> int:
    """Model calls one three_pass makes per image (for progress reporting)."""
    return sum(tile_count(height, width, ty, tx, overlap) for ty, tx in _shapes(tile_y, tile_x, encode))
