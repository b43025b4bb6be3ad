"""The SD1.5 / SDXL plug-in: LDM-layout UNets as diffusers' UNet2DConditionModel.

Step tensors (ComfyUI's `diffusion_model(x, timesteps, context, y, control)`): `x` [B,4,H,W], `timesteps`
[B] (0..999), `context` [B,T,D], `y` [B,ADM] (SDXL only), optional `control.<input|middle|output>.<N>`
residuals with params `control_lengths` (step.py). The forward is step.unet_forward.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from luna_stack.weights.checkpoint import unet_config_from_state_dict, unet_family
from luna_stack.weights.ldm_layout import unet_ldm_to_diffusers
from luna_stack.weights.precision import install_gguf_weights, load_weights
from luna_stack.wire.errors import BadRequest, ModelLoadError
from luna_stack.wire.tensors import require_tensor

from .arch import Architecture, DiffusionModel, Loaded, StateDict, StepInputs, Tensor
from .step import BlockResiduals, check_control, control_from_wire, input_block_shapes, unet_forward

CONTEXT = 77  # one prompt chunk: what start-time captures assume
NATIVE_LATENT = {"sdxl": (128, 128), "sd15": (64, 64)}
_GGUF_ARCH = {"sd15": "sd1", "sdxl": "sdxl"}


@dataclass(frozen=True)
class StepShape:
    """Everything an SD step graph is specialised to besides its rows (model and dtype are the runner's)."""

    height: int
    width: int
    context: int = CONTEXT
    control: tuple[tuple[str, int, int, int], ...] = ()  # (slot, channels, height, width), sorted by slot

    def __str__(self) -> str:
        extra = f" +{len(self.control)} control" if self.control else ""
        return f"{self.height}x{self.width} ctx{self.context}{extra}"


@dataclass(eq=False)
class SdUnet(DiffusionModel):
    module: UNet2DConditionModel

    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def family(self) -> str:
        return "sdxl" if self.adm_channels else "sd15"

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def context_dim(self) -> int:
        return int(self.config.cross_attention_dim)

    @property
    def adm_channels(self) -> int | None:
        """Width of `y` (SDXL: 2816), None for models without a label embedding."""
        if self.config.class_embed_type != "projection":
            return None
        return int(self.config.projection_class_embeddings_input_dim)

    def extra_description(self) -> dict[str, Any]:
        return {"context_dim": self.context_dim, "adm_channels": self.adm_channels}

    # -- requests -------------------------------------------------------------------------------------
    def parse_step(self, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> StepInputs:
        x = tensors["x"]
        rows = x.shape[0]
        checked = {"x": x, "timesteps": require_tensor(tensors, "timesteps", rank=1, dims={0: rows})}
        checked["context"] = require_tensor(tensors, "context", rank=3, dims={0: rows, 2: self.context_dim})
        if self.adm_channels is not None:
            checked["y"] = require_tensor(tensors, "y", rank=2, dims={0: rows, 1: self.adm_channels})
        elif "y" in tensors:
            raise BadRequest(f"model {self.name} ({self.family}) takes no y")
        if "guidance" in tensors:
            raise BadRequest(f"model {self.name} ({self.family}) takes no guidance (a Flux input)")
        lengths = params.get("control_lengths")
        if lengths is not None and not isinstance(lengths, dict):
            raise BadRequest('params.control_lengths must be an object like {"output": 12}')
        control = control_from_wire(tensors, lengths, len(input_block_shapes(self.module, 1, 1)))
        named = check_control(self.module, control, x).named()
        checked.update({f"control.{slot}": t for slot, t in named.items()})
        slots = tuple((slot, *t.shape[1:]) for slot, t in sorted(named.items()))
        return StepInputs(checked, StepShape(x.shape[2], x.shape[3], checked["context"].shape[1], slots))

    # -- the forward ----------------------------------------------------------------------------------
    def allocate(self, shape: StepShape, rows: int) -> dict[str, Tensor]:
        inputs = {
            "x": self.zeros(rows, self.in_channels, shape.height, shape.width),
            "timesteps": self.zeros(rows, dtype=torch.float32),
            "context": self.zeros(rows, shape.context, self.context_dim),
        }
        if self.adm_channels is not None:
            inputs["y"] = self.zeros(rows, self.adm_channels)
        for slot, channels, height, width in shape.control:
            inputs[f"control.{slot}"] = self.zeros(rows, channels, height, width)
        return inputs

    def forward(self, shape: StepShape, inputs: dict[str, Tensor]) -> Tensor:
        # Casts are no-ops on a graph's static buffers (allocated in these dtypes); eager batches
        # arrive in the client's dtype.
        def cast(t: Tensor, dtype: torch.dtype = self.dtype) -> Tensor:
            return t.to(device=self.device, dtype=dtype)

        named = {slot: cast(inputs[f"control.{slot}"]) for slot, *_ in shape.control}
        control = BlockResiduals.from_named(named)
        y = inputs.get("y")
        return unet_forward(
            self.module,
            cast(inputs["x"]),
            cast(inputs["timesteps"], torch.float32),
            cast(inputs["context"]),
            None if y is None else cast(y),
            control,
        )

    def warm_up_shapes(self, latents: Sequence[tuple[int, int]]) -> list[Hashable]:
        return [StepShape(h, w) for h, w in (latents or (NATIVE_LATENT[self.family],))]

    def example_inputs(self, rows: int, height: int, width: int, seed: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        inputs = {
            "x": torch.randn(rows, self.in_channels, height, width, generator=gen),
            "timesteps": torch.linspace(999.0, 500.0, rows),
            "context": torch.randn(rows, CONTEXT, self.context_dim, generator=gen),
        }
        if self.adm_channels is not None:
            inputs["y"] = torch.randn(rows, self.adm_channels, generator=gen)
        return inputs


class SdUnetArch(Architecture):
    name = "sd-unet"

    def claims(self, keys: Mapping[str, torch.Size]) -> bool:
        return "input_blocks.0.0.weight" in keys and "out.2.weight" in keys

    def gguf_arch(self, keys: Mapping[str, torch.Size]) -> str:
        family = unet_family({k: torch.empty(s, device="meta") for k, s in keys.items()})
        if family not in _GGUF_ARCH:
            raise ModelLoadError(f"cannot tell SD1.5 from SDXL (family {family})")
        return _GGUF_ARCH[family]

    def build(self, sd: StateDict, how: Loaded) -> SdUnet:
        try:
            config = unet_config_from_state_dict(sd)
            converted = unet_ldm_to_diffusers(sd, config)
        except ModelLoadError:
            raise
        except (KeyError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"not an SD1.5/SDXL UNet: {exc}") from None
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        if how.precision == "gguf":
            install_gguf_weights(unet, converted, how.dtype, how.device)
        else:
            load_weights(unet, converted, how.precision, how.device)
        unet.eval().requires_grad_(False)
        return SdUnet(how.name, how.path, unet, how.precision, how.dtype, how.device, 0, 0.0)
