"""MODEL for a UNet the stack serves: a real comfy ModelPatcher and BaseModel (sampling, conditioning,
model_sampling all stay ComfyUI's own), whose diffusion_model forwards each call to the UNet service.

Imported lazily: this module needs ComfyUI.
"""

from __future__ import annotations

from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

from .errors import LunaStackPatchError, check_remote_safe
from .lora_stack import add_to_options, stack_in
from .remote import Services

_CONFIGS = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}


class RemoteDiffusionModel(torch.nn.Module):
    """Takes ComfyUI's diffusion_model(x, timesteps, context, y, control, transformer_options) call."""

    def __init__(self, services: Services, model: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.services = services
        self.model_name = model
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        control: dict | None = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        options = transformer_options or {}
        check_remote_safe(options)
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:
            raise LunaStackPatchError(
                f"the shared UNet takes x, timesteps, context, y and control; got {extra}"
            )
        out = self.services.unet_step(self.model_name, x, timesteps, context, y, control, stack_in(options))
        return out.to(device=x.device, dtype=x.dtype)


def remote_model(services: Services, model: str, family: str) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over a BaseModel of ComfyUI's own class for the family, with a remote UNet."""
    unet = {**_CONFIGS[family].unet_config, "in_channels": 4, "out_channels": 4}
    config = _CONFIGS[family]({**unet, "disable_unet_model_creation": True})
    config.set_inference_dtype(torch.float32, None)
    device = comfy.model_management.get_torch_device()
    base = config.get_model({}, device=device)
    base.diffusion_model = RemoteDiffusionModel(services, model)
    base.memory_required = lambda input_shape, cond_shapes=None: 0  # the memory is the service's
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def with_lora(patcher: comfy.model_patcher.ModelPatcher, name: str, strength: float) -> Any:
    """A clone carrying one more LoRA (what LoraLoader does to a local MODEL)."""
    clone = patcher.clone()
    add_to_options(clone.model_options.setdefault("transformer_options", {}), name, strength)
    return clone


def is_remote(patcher: Any) -> bool:
    return isinstance(getattr(getattr(patcher, "model", None), "diffusion_model", None), RemoteDiffusionModel)
