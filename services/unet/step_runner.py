"""The runner of a diffusion model's steps (gpu/graphs.py GraphRunner), for any architecture (arch.py):
its `allocate` gives a graph's static inputs and its `forward` is what eager batches and captured graphs
both run. With graphs off the runner runs every batch eager; with them on it replays a graph per
(StepInputs.shape, row bucket), LoRA stacks through the graph's static adapter bank (allocated when the
first LoRA batch needs it)."""

from __future__ import annotations

from typing import Any

from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.gpu.graphs import GraphRunner
from luna_stack.lora.bank import LoraBank
from luna_stack.lora.side import attach_side_paths

from .arch import DiffusionModel


def build_runner(
    model: DiffusionModel, config: GraphConfig, counter: Any = None, *, graphs: bool = True
) -> GraphRunner:
    slots = attach_side_paths(model.module)
    # fp8 layerwise casting swaps each layer's weight for an upcast copy inside its forward and back
    # after it: a captured graph would go on reading storage the next cast frees (an illegal memory
    # access on the H200), so fp8 models step eager.
    graphs = graphs and model.precision != "fp8"
    bank = None
    if graphs and config.lora_slots:
        bank = LoraBank(slots, config.lora_slots, config.lora_rank, model.dtype, model.device)
    return GraphRunner(
        name=model.name,
        op="unet",
        forward=model.forward,
        allocate=model.allocate,
        device=model.device,
        config=config,
        slots=slots,
        bank=bank,
        counter=counter,
        cuda_graphs=model.device.type == "cuda",
        enabled=graphs,
        weights_bytes=model.nbytes,
    )
