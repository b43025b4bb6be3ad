"""The SD3 / SD3.5 plug-in: SAI-layout MMDiTs as diffusers' SD3Transformer2DModel.

Step tensors (ComfyUI's `diffusion_model(x, timesteps, context, y, control)` for SD3): `x` [B,16,H,W]
(any size up to the position table; odd sizes padded to the 2×2 patch and cropped back), `timesteps`
[B] (sigma × 1000), `context` [B,T,4096] (CLIP-L ++ CLIP-G padded to 4096, then T5-XXL tokens),
`y` [B,2048] (CLIP-L ++ CLIP-G pooled), optional ControlNet residuals `control.output.<i>`
[B or 1, patches, width], added to the image tokens after joint block i (ComfyUI indexes its
`control["output"]` list by block: nothing is popped, so `control_lengths` does not apply).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from luna_stack.lora.resolve import register_aliases
from luna_stack.weights.precision import QuantizedWeight, install_gguf_weights, load_weights
from luna_stack.wire.contract import VAE_SCALE
from luna_stack.wire.errors import BadRequest, InvalidTensor, LimitExceeded
from luna_stack.wire.tensors import require_tensor

from ..arch import Architecture, DiffusionModel, Loaded, StateDict, StepInputs, Tensor
from .forward import mmdit_forward, patches
from .layout import claims_keys, config_from_keys, module_aliases, sai_to_diffusers

CONTEXT = 154  # ComfyUI's SD3 prompt: 77 CLIP tokens ++ 77 T5 tokens (what start-time captures assume)
MAX_CONTEXT = 2048  # tokens: attention cost grows with their square
NATIVE_LATENT = (128, 128)  # 1024² images
_CONTROL = re.compile(r"control\.output\.(\d+)")
# fp8: every Linear stays e4m3, the adaLN modulations too (diffusers' default skip list, "norm", would hold
# them in bf16, ~30% of SD3; ComfyUI keeps them fp8); the patch embedding and its table compute in bf16.
FP8_SKIP = ("pos_embed",)


@dataclass(frozen=True)
class Sd3Shape:
    """What an SD3 step graph is specialised to besides its rows."""

    height: int
    width: int
    context: int = CONTEXT
    control: tuple[int, ...] = ()  # joint blocks that get a residual, ascending

    def __str__(self) -> str:
        extra = f" +{len(self.control)} control" if self.control else ""
        return f"{self.height}x{self.width} ctx{self.context}{extra}"


@dataclass(eq=False)
class Sd3Model(DiffusionModel):
    module: SD3Transformer2DModel

    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def family(self) -> str:
        return "sd3"

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def context_dim(self) -> int:
        return int(self.config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return int(self.config.pooled_projection_dim)

    @property
    def hidden(self) -> int:
        return int(self.module.inner_dim)

    @property
    def max_latent(self) -> int:
        """Latent pixels a side the position table covers."""
        return int(self.config.pos_embed_max_size * self.config.patch_size)

    def tokens(self, height: int, width: int) -> int:
        p = self.config.patch_size
        return patches(height, p) * patches(width, p)

    def extra_description(self) -> dict[str, Any]:
        return {
            "context_dim": self.context_dim,
            "pooled_dim": self.pooled_dim,
            "blocks": len(self.module.transformer_blocks),
            "dual_attention_blocks": list(self.config.dual_attention_layers),
            "qk_norm": self.config.qk_norm,
            "max_image_size": self.max_latent * VAE_SCALE,
        }

    # -- requests -------------------------------------------------------------------------------------
    def parse_step(self, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> StepInputs:
        x = tensors["x"]
        rows, _, height, width = x.shape
        if "guidance" in tensors:
            raise BadRequest(f"model {self.name} (sd3) takes no guidance (a Flux input)")
        if max(height, width) > self.max_latent:
            side = self.max_latent * VAE_SCALE
            raise InvalidTensor(
                f"a latent of {height}×{width} is larger than {self.name}'s position table allows "
                f"({self.max_latent}×{self.max_latent} latent pixels)",
                hint=f"images of at most {side}×{side} pixels",
            )
        checked = {"x": x, "timesteps": require_tensor(tensors, "timesteps", rank=1, dims={0: rows})}
        checked["context"] = require_tensor(tensors, "context", rank=3, dims={0: rows, 2: self.context_dim})
        if checked["context"].shape[1] > MAX_CONTEXT:
            raise LimitExceeded(f"a context of {checked['context'].shape[1]} tokens exceeds {MAX_CONTEXT}")
        if "y" not in tensors:
            raise BadRequest(
                f"model {self.name} (sd3) needs y [B,{self.pooled_dim}]: the pooled CLIP-L ++ CLIP-G output"
            )
        checked["y"] = require_tensor(tensors, "y", rank=2, dims={0: rows, 1: self.pooled_dim})
        control = self._control(tensors, rows, self.tokens(height, width))
        checked.update({f"control.output.{i}": t for i, t in control.items()})
        shape = Sd3Shape(height, width, checked["context"].shape[1], tuple(sorted(control)))
        return StepInputs(checked, shape)

    def _control(self, tensors: Mapping[str, Tensor], rows: int, tokens: int) -> dict[int, Tensor]:
        """ControlNet residuals by block; one row is added to every row, as ComfyUI's `x += add`
        broadcasts it, and comes back expanded so batches can merge."""
        blocks = len(self.module.transformer_blocks)
        out: dict[int, Tensor] = {}
        for name, t in tensors.items():
            if not name.startswith("control"):
                continue
            m = _CONTROL.fullmatch(name)
            if m is None:
                raise BadRequest(
                    f"tensor {name!r}: SD3 control residuals are named control.output.<block> "
                    "(ComfyUI's control['output'] list; SD3 has no input/middle residuals)"
                )
            block = int(m[1])
            if block >= blocks:
                raise BadRequest(f"tensor {name!r}: model {self.name} has {blocks} joint blocks")
            want = [rows, tokens, self.hidden]
            if list(t.shape) not in (want, [1, *want[1:]]):
                raise InvalidTensor(
                    f"control residual {name} has shape {list(t.shape)}, expected {want} (or 1 row)"
                )
            out[block] = t.expand(want)
        return out

    # -- the forward ----------------------------------------------------------------------------------
    def allocate(self, shape: Sd3Shape, rows: int) -> dict[str, Tensor]:
        inputs = {
            "x": self.zeros(rows, self.in_channels, shape.height, shape.width),
            "timesteps": self.zeros(rows, dtype=torch.float32),
            "context": self.zeros(rows, shape.context, self.context_dim),
            "y": self.zeros(rows, self.pooled_dim),
        }
        tokens = self.tokens(shape.height, shape.width)
        inputs.update({f"control.output.{i}": self.zeros(rows, tokens, self.hidden) for i in shape.control})
        return inputs

    def forward(self, shape: Sd3Shape, inputs: dict[str, Tensor]) -> Tensor:
        # Casts are no-ops on a graph's static buffers (allocated in these dtypes); eager batches
        # arrive in the client's dtype.
        def cast(t: Tensor, dtype: torch.dtype = self.dtype) -> Tensor:
            return t.to(device=self.device, dtype=dtype)

        return mmdit_forward(
            self.module,
            cast(inputs["x"]),
            cast(inputs["timesteps"], torch.float32),
            cast(inputs["context"]),
            cast(inputs["y"]),
            {i: cast(inputs[f"control.output.{i}"]) for i in shape.control},
        )

    def warm_up_shapes(self, latents: Sequence[tuple[int, int]]) -> list[Hashable]:
        return [Sd3Shape(h, w) for h, w in (latents or (NATIVE_LATENT,))]

    def example_inputs(self, rows: int, height: int, width: int, seed: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            "x": torch.randn(rows, self.in_channels, height, width, generator=gen),
            "timesteps": torch.linspace(999.0, 500.0, rows),
            "context": torch.randn(rows, CONTEXT, self.context_dim, generator=gen),
            "y": torch.randn(rows, self.pooled_dim, generator=gen),
        }


class Sd3Arch(Architecture):
    name = "sd3-mmdit"

    def claims(self, keys: Mapping[str, torch.Size]) -> bool:
        return claims_keys(keys)

    def gguf_arch(self, keys: Mapping[str, torch.Size]) -> str:
        return "sd3"

    def build(self, sd: StateDict, how: Loaded) -> Sd3Model:
        cfg = config_from_keys(sd)
        converted = sai_to_diffusers(sd, cfg)
        # The position table is a buffer, not a weight: held in the compute dtype whatever the file
        # stores (fp8 casting never reaches buffers; a GGUF copy is expanded once).
        table = converted.get("pos_embed.pos_embed")
        if isinstance(table, QuantizedWeight):
            converted["pos_embed.pos_embed"] = table.dequantize(how.dtype)
        elif table is not None:
            converted["pos_embed.pos_embed"] = table.to(how.dtype)
        with torch.device("meta"):
            module = SD3Transformer2DModel(**cfg.diffusers_kwargs())
        if how.precision == "gguf":
            install_gguf_weights(module, converted, how.dtype, how.device)
        else:
            load_weights(module, converted, how.precision, how.device, fp8_skip=FP8_SKIP)
        module.eval().requires_grad_(False)
        register_aliases(module, "unet", module_aliases(cfg))  # SAI-named LoRA files (fused qkv)
        return Sd3Model(how.name, how.path, module, how.precision, how.dtype, how.device, 0, 0.0)
