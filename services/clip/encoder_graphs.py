"""CLIP text encoders as captured CUDA graphs (core GraphRunner): one runner per encoder, graphs per set
of layers a batch reads (clip skip) and row bucket, from input embeddings to those layers' outputs and the
final layer norm. Token lookup, prompt weighting and the pooled projection stay eager: a few kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.gpu.graphs import GraphRunner
from luna_stack.lora.bank import LoraBank
from luna_stack.lora.side import Stack, attach_side_paths, row_groups
from luna_stack.lora.stack import LoraStack
from luna_stack.weights.precision import resident_bytes

from .conditioning import Forward, choose_layer
from .encoders import ClipEncoder, ForwardOutput


@dataclass(frozen=True)
class Layers:
    """The encoder layers (0-based) whose outputs a graph returns besides the final layer norm."""

    keep: tuple[int, ...]

    def __str__(self) -> str:
        return f"layers {','.join(map(str, self.keep))}" if self.keep else "final"


def build_runner(encoder: ClipEncoder, name: str, config: GraphConfig, counter: Any = None) -> GraphRunner:
    slots = attach_side_paths(encoder.model)
    bank = None
    if config.lora_slots:
        bank = LoraBank(slots, config.lora_slots, config.lora_rank, encoder.dtype, encoder.device)

    def allocate(shape: Layers, rows: int) -> dict[str, torch.Tensor]:
        embeds = torch.zeros(rows, encoder.length, encoder.width, dtype=encoder.dtype, device=encoder.device)
        return {"embeds": embeds}

    def forward(shape: Layers, inputs: dict[str, torch.Tensor]) -> ForwardOutput:
        return encoder.forward(inputs["embeds"], shape.keep)

    return GraphRunner(
        name=f"{name} CLIP-{encoder.kind.upper()}",
        op="clip",
        forward=forward,  # type: ignore[arg-type]
        allocate=allocate,  # type: ignore[arg-type]
        device=encoder.device,
        config=config,
        slots=slots,
        bank=bank,
        counter=counter,
        cuda_graphs=encoder.device.type == "cuda",
        weights_bytes=resident_bytes(encoder.model),
    )


def default_layers(encoder: ClipEncoder, family: str) -> Layers:
    """What a request without clip_skip reads: SDXL the penultimate layer, SD1.5 the final norm only."""
    layer = choose_layer(family, None, encoder.num_layers)
    return Layers(() if layer.index is None else (layer.index,))


def graphed_forward(runners: dict[str, GraphRunner], slots_of: dict[str, Any]) -> Forward:
    """The conditioning Forward that replays `runners` (by encoder key; the runner runs a batch eager
    when it cannot replay it), eager under a LoRA plan for an encoder without a runner."""

    def forward(
        encoder: ClipEncoder, embeds: torch.Tensor, keep: frozenset[int], row_lora: Sequence[LoraStack]
    ) -> ForwardOutput:
        stacks: list[tuple[int, Stack]] = [(1, s.part(encoder.kind)) for s in row_lora]

        runner = runners.get(encoder.kind)
        if runner is None:
            with slots_of[encoder.kind].plan(row_groups(stacks)):
                return encoder.forward(embeds, keep)
        return runner.run(Layers(tuple(sorted(keep))), {"embeds": [embeds]}, stacks)

    return forward
