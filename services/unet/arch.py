"""Diffusion architectures: one contract for every network the unet service steps, one plug-in each.

The unet family (family.py) owns what every step shares: resolving the model a request names, the
limits on rows and latent pixels, LoRA stacks, batching and the reply. An architecture owns what depends
on the network:

- `Architecture.claims(keys)` / `build(...)`: which files it reads (from key names and shapes, as
  ComfyUI's model detection does) and the resident `DiffusionModel` it builds from their tensors;
- `DiffusionModel.parse_step`: the tensors a step carries and their checks (4xx on any mismatch);
- `StepInputs.shape`: what one forward is specialised to besides its rows (latent size, tokens, control
  slots) — steps of equal shapes batch, and a CUDA graph is captured per (shape, row bucket);
- `allocate(shape, rows)`: a graph's static input buffers; `forward(shape, inputs)`: the one forward
  that eager batches and graph captures both run, ComfyUI's `diffusion_model(...)` call for the family.

Plug-ins, tried in order by `load_diffusion_model` (loader.py): sd_unet.py (SD1.5 / SDXL UNets),
flux/ (Flux.1 DiTs), sd3/ (SD3 / SD3.5 MMDiTs).
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from luna_stack.weights.precision import QuantizedWeight

Tensor = torch.Tensor
# A file's tensors by name (prefix stripped); GGUF weights may stay quantized.
StateDict = dict[str, "Tensor | QuantizedWeight"]


@dataclass(frozen=True)
class StepInputs:
    """One request's checked step inputs."""

    tensors: dict[str, Tensor]  # wire name -> tensor, rows first; equal shapes have equal names
    shape: Hashable  # what the forward is specialised to besides rows (must be hashable and printable)


@dataclass(eq=False)
class DiffusionModel(abc.ABC):
    """A resident diffusion network and what requests are checked against."""

    name: str
    path: Path
    module: nn.Module  # the network; LoRA side paths attach to its Linear / Conv2d layers
    precision: str  # fp32 / fp16 / bf16 / fp8 / gguf
    dtype: torch.dtype  # compute dtype
    device: torch.device
    nbytes: int
    load_seconds: float
    quant_types: dict[str, int] = field(default_factory=dict)  # GGUF: tensor count per type
    runner: Any = None  # its step runner (step_runner.py): eager, or CUDA graphs where they are on

    min_latent: ClassVar[int] = 8  # latent pixels a side below which the network has nothing to work on

    @property
    @abc.abstractmethod
    def family(self) -> str:
        """sd15 / sdxl / flux / sd3 (what clients pick ComfyUI's model class by)."""

    @property
    @abc.abstractmethod
    def in_channels(self) -> int: ...

    @abc.abstractmethod
    def parse_step(self, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> StepInputs:
        """Check a step's tensors against this network (x is rank 4 with `in_channels` already)."""

    @abc.abstractmethod
    def allocate(self, shape: Any, rows: int) -> dict[str, Tensor]:
        """Zeroed static inputs of a graph for `rows` rows of `shape` (the names parse_step returns)."""

    def zeros(self, rows: int, *dims: int, dtype: torch.dtype | None = None) -> Tensor:
        """One static input for `allocate`: `rows` rows, in the compute dtype unless given, on the device."""
        return torch.zeros(rows, *dims, dtype=dtype or self.dtype, device=self.device)

    @abc.abstractmethod
    def forward(self, shape: Any, inputs: dict[str, Tensor]) -> Tensor:
        """One step for a batch; inputs may be in the client's dtype and device (cast here)."""

    @abc.abstractmethod
    def warm_up_shapes(self, latents: Sequence[tuple[int, int]]) -> list[Hashable]:
        """Shapes captured at start: these latent sizes (empty = the family's native size)."""

    @abc.abstractmethod
    def example_inputs(self, rows: int, height: int, width: int, seed: int) -> dict[str, Tensor]:
        """Random step inputs of a valid request (wire names, float32 on the CPU): what `convert` and the
        benchmarks measure a copy's error and a step's time with."""

    def extra_description(self) -> dict[str, Any]:
        """Family-specific facts for GET /v1/unet/models (widths, guidance, ...)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "in_channels": self.in_channels,
            "precision": self.precision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "bytes": self.nbytes,
            "load_seconds": round(self.load_seconds, 3),
            **({"gguf_types": self.quant_types} if self.quant_types else {}),
            **self.extra_description(),
        }


@dataclass(frozen=True)
class Loaded:
    """What build() receives besides the tensors (load bookkeeping filled in by the loader)."""

    name: str
    path: Path
    precision: str  # after the file's own say (gguf / fp8)
    dtype: torch.dtype  # compute dtype
    device: torch.device


class Architecture(abc.ABC):
    """One plug-in: recognises its files and builds resident models from them."""

    name: ClassVar[str]

    @abc.abstractmethod
    def claims(self, keys: Mapping[str, torch.Size]) -> bool:
        """True if these tensor names and shapes (prefix stripped) are this architecture's layout."""

    @abc.abstractmethod
    def gguf_arch(self, keys: Mapping[str, torch.Size]) -> str:
        """`general.architecture` of a GGUF copy, city96's ComfyUI-GGUF convention (sd1, sdxl, flux, sd3)."""

    @abc.abstractmethod
    def build(self, sd: StateDict, how: Loaded) -> DiffusionModel:
        """The resident model: weights on `how.device` stored as `how.precision`, frozen, eval mode.
        `runner`, `nbytes` and `load_seconds` are set by the loader afterwards."""
