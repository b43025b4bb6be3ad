"""The Flux.1 plug-in (arch.py's contract): dev (guidance embedding) and schnell (none) DiTs in BFL
layout, loaded into diffusers' FluxTransformer2DModel and stepped by forward.py.

Step tensors: `x` [B,C,H,W] (C = the file's latent channels, 16), `timesteps` [B] (sigma, 0..1),
`context` [B,T,D] (T5-XXL: D = 4096), `y` [B,P] (pooled CLIP-L: P = 768), `guidance` [B] (dev only:
ComfyUI's FluxGuidance value), `control.input.<i>` / `control.output.<i>` [B or 1, n, hidden]. Image
tokens and so positions depend on the latent size: a step is specialised to (H, W, T, control slots).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import FluxTransformer2DModel

from luna_stack.lora.resolve import register_aliases
from luna_stack.weights.precision import install_gguf_weights, load_weights
from luna_stack.wire.errors import BadRequest, InvalidTensor, LimitExceeded, ModelLoadError
from luna_stack.wire.tensors import require_tensor

from ..arch import Architecture, DiffusionModel, Loaded, StateDict, StepInputs
from .forward import flux_forward, token_grid
from .layout import FluxConfig, bfl_to_diffusers, infer_config, is_flux, module_map

log = logging.getLogger(__name__)
Tensor = torch.Tensor
MAX_CONTEXT = 1024  # text tokens a step may carry (ComfyUI pads T5 to 256; long prompts reach ~512)
NATIVE_LATENT = (128, 128)  # 1024² images
NATIVE_CONTEXT = 256
_CONTROL_KINDS = ("input", "output")
# fp8: every Linear stays e4m3 (modulations and projections too, as ComfyUI keeps fp8 Flux files);
# diffusers' default skip list would hold the modulations, a quarter of Flux, in bf16.
FP8_SKIP = ("pos_embed",)  # after double block i / after single block i


@dataclass(frozen=True)
class FluxShape:
    """What a Flux step is specialised to besides its rows."""

    height: int
    width: int
    context: int = NATIVE_CONTEXT
    control: tuple[tuple[str, int], ...] = ()  # (slot "input.i" / "output.i", tokens), sorted

    def __str__(self) -> str:
        extra = f" +{len(self.control)} control" if self.control else ""
        return f"{self.height}x{self.width} ctx{self.context}{extra}"


@dataclass(eq=False)
class FluxModel(DiffusionModel):
    config: FluxConfig | None = None

    @property
    def cfg(self) -> FluxConfig:
        assert self.config is not None
        return self.config

    @property
    def family(self) -> str:
        return "flux"

    @property
    def in_channels(self) -> int:
        return self.cfg.in_channels // 4

    @property
    def guidance(self) -> bool:
        return self.cfg.guidance

    def parse_step(self, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> StepInputs:
        cfg = self.cfg
        x = tensors["x"]
        rows = x.shape[0]
        timesteps = require_tensor(tensors, "timesteps", rank=1, dims={0: rows})
        context = require_tensor(tensors, "context", rank=3, dims={0: rows})
        if context.shape[2] != cfg.context_dim:
            raise InvalidTensor(
                f"context width {context.shape[2]} does not fit {self.name}: Flux takes T5 embeddings "
                f"of width {cfg.context_dim}"
            )
        if context.shape[1] > MAX_CONTEXT:
            raise LimitExceeded(f"{context.shape[1]} context tokens exceed Flux's limit of {MAX_CONTEXT}")
        if "y" not in tensors:
            raise BadRequest(
                f"Flux model {self.name} needs `y`: the pooled CLIP-L embedding [B,{cfg.pooled_dim}]"
            )
        y = require_tensor(tensors, "y", rank=2, dims={0: rows})
        if y.shape[1] != cfg.pooled_dim:
            raise InvalidTensor(
                f"y of width {y.shape[1]} does not fit Flux model {self.name} (pooled CLIP-L, width "
                f"{cfg.pooled_dim})",
                hint="an SD-style y (SDXL: 2816) is for an SDXL UNet" if y.shape[1] == 2816 else None,
            )
        inputs = {"x": x, "timesteps": timesteps, "context": context, "y": y}
        if cfg.guidance:
            if "guidance" not in tensors:
                raise BadRequest(
                    f"Flux-dev model {self.name} needs `guidance` [B]",
                    hint="ComfyUI's FluxGuidance value, 3.5 by default",
                )
            inputs["guidance"] = require_tensor(tensors, "guidance", rank=1, dims={0: rows})
        elif "guidance" in tensors:
            raise BadRequest(
                f"model {self.name} has no guidance embedding (Flux-schnell): send no `guidance`",
                hint="ComfyUI ignores guidance for such models; leave it out",
            )
        control = self._parse_control(tensors, x)
        inputs.update({f"control.{slot}": t for slot, t in control.items()})
        slots = tuple((slot, t.shape[1]) for slot, t in sorted(control.items()))
        return StepInputs(inputs, FluxShape(x.shape[2], x.shape[3], context.shape[1], slots))

    def _parse_control(self, tensors: Mapping[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        rows, cfg = x.shape[0], self.cfg
        tokens = token_grid(x.shape[2], x.shape[3])
        img_tokens = tokens[0] * tokens[1]
        depth = {"input": cfg.depth, "output": cfg.depth_single}
        control: dict[str, Tensor] = {}
        for name, t in tensors.items():
            if not name.startswith("control"):
                continue
            kind, _, index = name.removeprefix("control.").partition(".")
            if kind not in _CONTROL_KINDS or not index.isdigit():
                raise BadRequest(
                    f"tensor {name!r}: Flux control residuals are control.input.<i> (after double block "
                    "i) and control.output.<i> (after single block i)"
                )
            if int(index) >= depth[kind]:
                continue  # past the last block: ComfyUI never reaches it either
            if t.dim() != 3 or t.shape[0] not in (1, rows) or not 1 <= t.shape[1] <= img_tokens:
                raise InvalidTensor(
                    f"control residual {name} has shape {list(t.shape)}, expected [{rows} or 1, "
                    f"<= {img_tokens} image tokens, {cfg.hidden}]"
                )
            checked = require_tensor(tensors, name, dims={2: cfg.hidden})
            control[f"{kind}.{int(index)}"] = checked.expand(rows, -1, -1)
        return control

    def allocate(self, shape: FluxShape, rows: int) -> dict[str, Tensor]:
        cfg = self.cfg
        inputs = {
            "x": self.zeros(rows, self.in_channels, shape.height, shape.width),
            "timesteps": self.zeros(rows, dtype=torch.float32),
            "context": self.zeros(rows, shape.context, cfg.context_dim),
            "y": self.zeros(rows, cfg.pooled_dim),
        }
        if cfg.guidance:
            inputs["guidance"] = self.zeros(rows, dtype=torch.float32)
        for slot, tokens in shape.control:
            inputs[f"control.{slot}"] = self.zeros(rows, tokens, cfg.hidden)
        return inputs

    def forward(self, shape: FluxShape, inputs: dict[str, Tensor]) -> Tensor:
        # Casts are no-ops on a graph's static buffers; eager batches arrive in the client's dtype.
        def cast(t: Tensor, dtype: torch.dtype = self.dtype) -> Tensor:
            return t.to(device=self.device, dtype=dtype)

        guidance = inputs.get("guidance")
        return flux_forward(
            self.module,  # type: ignore[arg-type]
            cast(inputs["x"]),
            cast(inputs["timesteps"], torch.float32),
            cast(inputs["context"]),
            cast(inputs["y"]),
            None if guidance is None else cast(guidance, torch.float32),
            {slot: cast(inputs[f"control.{slot}"]) for slot, _ in shape.control},
        )

    def warm_up_shapes(self, latents: Sequence[tuple[int, int]]) -> list[Hashable]:
        return [FluxShape(h, w) for h, w in (latents or (NATIVE_LATENT,))]

    def example_inputs(self, rows: int, height: int, width: int, seed: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        inputs = {
            "x": torch.randn(rows, self.in_channels, height, width, generator=gen),
            "timesteps": torch.linspace(1.0, 0.5, rows),
            "context": torch.randn(rows, NATIVE_CONTEXT, cfg.context_dim, generator=gen),
            "y": torch.randn(rows, cfg.pooled_dim, generator=gen),
        }
        if cfg.guidance:
            inputs["guidance"] = torch.full((rows,), 3.5)
        return inputs

    def extra_description(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "variant": "dev" if cfg.guidance else "schnell",
            "guidance_embed": cfg.guidance,
            "hidden_size": cfg.hidden,
            "double_blocks": cfg.depth,
            "single_blocks": cfg.depth_single,
            "context_dim": cfg.context_dim,
            "pooled_dim": cfg.pooled_dim,
        }


def build_module(
    sd: StateDict, precision: str, dtype: torch.dtype, device: torch.device
) -> tuple[FluxConfig, FluxTransformer2DModel]:
    """diffusers' FluxTransformer2DModel for a BFL state dict, weights stored as `precision`, frozen."""
    config = infer_config({k: v.shape for k, v in sd.items()})
    converted = bfl_to_diffusers(sd, config)
    if converted.dequantized:
        log.warning(
            "GGUF rows of %d fused tensors do not start on block boundaries: dequantized to %s (%s...)",
            len(converted.dequantized),
            dtype,
            converted.dequantized[0],
        )
    with torch.device("meta"):
        module = FluxTransformer2DModel(**config.diffusers_kwargs())
    try:
        if precision == "gguf":
            install_gguf_weights(module, converted.state_dict, dtype, device)
        else:
            load_weights(module, converted.state_dict, precision, device, fp8_skip=FP8_SKIP)
    except (RuntimeError, ValueError) as exc:  # a missing tensor or a shape the config does not predict
        raise ModelLoadError(f"Flux tensors do not fit the inferred network: {exc}") from None
    module.eval().requires_grad_(False)
    register_aliases(module, "unet", module_map(config))
    return config, module


class FluxArch(Architecture):
    name: ClassVar[str] = "flux"

    def claims(self, keys: Mapping[str, torch.Size]) -> bool:
        return is_flux(keys)

    def gguf_arch(self, keys: Mapping[str, torch.Size]) -> str:
        return "flux"

    def build(self, sd: StateDict, how: Loaded) -> FluxModel:
        config, module = build_module(sd, how.precision, how.dtype, how.device)
        return FluxModel(
            name=how.name,
            path=how.path,
            module=module,
            precision=how.precision,
            dtype=how.dtype,
            device=how.device,
            nbytes=0,
            load_seconds=0.0,
            config=config,
        )
