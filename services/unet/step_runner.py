"""The runner of a UNet's steps (gpu/graphs.py GraphRunner): the shape a step graph is specialised to, its
static inputs, and the one forward (step.unet_forward) that eager batches and captured graphs both run.
With graphs off the runner runs every batch eager; with them on it replays a graph per (shape, bucket)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.gpu.graphs import GraphRunner
from luna_stack.lora.bank import LoraBank
from luna_stack.lora.side import attach_side_paths

from .loader import LoadedUnet
from .step import BlockResiduals, unet_forward

CONTEXT = 77  # one prompt chunk: what start-time captures assume
NATIVE_LATENT = {"sdxl": (128, 128), "sd15": (64, 64)}


@dataclass(frozen=True)
class StepShape:
    """Everything a step graph is specialised to besides its rows (model and dtype are the runner's)."""

    height: int
    width: int
    context: int = CONTEXT
    control: tuple[tuple[str, int, int, int], ...] = ()  # (slot, channels, height, width), sorted by slot

    def __str__(self) -> str:
        extra = f" +{len(self.control)} control" if self.control else ""
        return f"{self.height}x{self.width} ctx{self.context}{extra}"


def step_shape(x: torch.Tensor, context: torch.Tensor, control: dict[str, torch.Tensor]) -> StepShape:
    slots = tuple((slot, *t.shape[1:]) for slot, t in sorted(control.items()))
    return StepShape(x.shape[2], x.shape[3], context.shape[1], slots)  # type: ignore[arg-type]


def build_runner(
    model: LoadedUnet, config: GraphConfig, counter: Any = None, *, graphs: bool = True
) -> GraphRunner:
    unet = model.unet
    slots = attach_side_paths(unet)
    bank = None
    if graphs and config.lora_slots:
        bank = LoraBank(slots, config.lora_slots, config.lora_rank, model.dtype, model.device)

    def allocate(shape: StepShape, rows: int) -> dict[str, torch.Tensor]:
        def zeros(*dims: int, dtype: torch.dtype = model.dtype) -> torch.Tensor:
            return torch.zeros(rows, *dims, dtype=dtype, device=model.device)

        inputs = {
            "x": zeros(model.in_channels, shape.height, shape.width),
            "timesteps": zeros(dtype=torch.float32),
            "context": zeros(shape.context, model.context_dim),
        }
        if model.adm_channels is not None:
            inputs["y"] = zeros(model.adm_channels)
        for slot, channels, height, width in shape.control:
            inputs[f"control.{slot}"] = zeros(channels, height, width)
        return inputs

    def forward(shape: StepShape, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Casts are no-ops on a graph's static buffers (allocated in these dtypes); eager batches
        # arrive in the client's dtype.
        def cast(t: torch.Tensor, dtype: torch.dtype = model.dtype) -> torch.Tensor:
            return t.to(device=model.device, dtype=dtype)

        control = BlockResiduals.from_named(
            {slot: cast(inputs[f"control.{slot}"]) for slot, *_ in shape.control}
        )
        y = inputs.get("y")
        return unet_forward(
            unet,
            cast(inputs["x"]),
            cast(inputs["timesteps"], torch.float32),
            cast(inputs["context"]),
            None if y is None else cast(y),
            control,
        )

    return GraphRunner(
        name=model.name,
        op="unet",
        forward=forward,  # type: ignore[arg-type]
        allocate=allocate,  # type: ignore[arg-type]
        device=model.device,
        config=config,
        slots=slots,
        bank=bank,
        counter=counter,
        cuda_graphs=model.device.type == "cuda",
        enabled=graphs,
    )


def warm_up_shapes(model: LoadedUnet, latents: tuple[tuple[int, int], ...]) -> list[StepShape]:
    return [StepShape(h, w) for h, w in (latents or (NATIVE_LATENT[model.family],))]
