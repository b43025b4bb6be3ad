"""MODEL for a diffusion model the stack serves: a real comfy ModelPatcher and BaseModel of ComfyUI's own
class for the family (sampling, conditioning, model_sampling — Flux's and SD3's flow-matching shift,
FluxGuidance — all stay ComfyUI's), whose diffusion_model forwards each call to the unet service.

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
from .remote import Services, wire_dtype

# The unet service's family (and, for Flux, whether the model embeds guidance) -> ComfyUI's model config.
_CONFIGS = {
    "sd15": comfy.supported_models.SD15,
    "sdxl": comfy.supported_models.SDXL,
    "flux": comfy.supported_models.Flux,
    "flux-schnell": comfy.supported_models.FluxSchnell,
    "sd3": comfy.supported_models.SD3,
}
_LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16, "flux-schnell": 16, "sd3": 16}


class RemoteDiffusionModel(torch.nn.Module):
    """Takes ComfyUI's diffusion_model(x, timesteps, context, y, [guidance,] control, transformer_options)
    call (Flux's BaseModel sends guidance; a model without a guidance embedding ignores it, as ComfyUI's
    own Flux does)."""

    def __init__(
        self,
        services: Services,
        model: str,
        dtype: torch.dtype = torch.float32,
        guidance_embed: bool = False,
        wire_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.services = services
        self.model_name = model
        self._dtype = dtype
        self.guidance_embed = guidance_embed
        self.wire_dtype = wire_dtype  # the service's compute dtype: what steps travel in

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
        guidance: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        options = transformer_options or {}
        check_remote_safe(options)
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:
            raise LunaStackPatchError(
                f"the shared model takes x, timesteps, context, y, guidance and control; got {extra}"
            )
        if not self.guidance_embed:
            guidance = None
        out = self.services.unet_step(
            self.model_name, x, timesteps, context, y, control, stack_in(options), guidance, self.wire_dtype
        )
        return out.to(x.device)  # in x's dtype already (Services.unet_step)


def comfy_family(info: dict[str, Any]) -> str:
    """The config key for what the unet service says about a model (GET /v1/unet/load's reply)."""
    family = info["family"]
    if family == "flux" and not info.get("guidance_embed", True):
        return "flux-schnell"
    return family


def remote_model(services: Services, model: str, info: dict[str, Any]) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over a BaseModel of ComfyUI's own class for the family, with a remote network."""
    family = comfy_family(info)
    if family not in _CONFIGS:
        raise LunaStackPatchError(f"the shared model {model!r} is {family}, which this pack cannot drive")
    channels = _LATENT_CHANNELS[family]
    unet = {**_CONFIGS[family].unet_config, "in_channels": channels, "out_channels": channels}
    config = _CONFIGS[family]({**unet, "disable_unet_model_creation": True})
    config.set_inference_dtype(torch.float32, None)
    # On the host, the sampler's per-step work stays off the GPU (settings.py: LUNA_SAMPLE_ON_HOST).
    on_host = services.settings.sample_on_host
    device = torch.device("cpu") if on_host else comfy.model_management.get_torch_device()
    base = config.get_model({}, device=device)
    base.diffusion_model = RemoteDiffusionModel(
        services, model, guidance_embed=family == "flux", wire_dtype=wire_dtype(info)
    )
    base.memory_required = lambda input_shape, cond_shapes=None: 0  # the memory is the service's
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def with_lora(patcher: comfy.model_patcher.ModelPatcher, name: str, strength: float) -> Any:
    """A clone carrying one more LoRA (what LoraLoader does to a local MODEL)."""
    clone = patcher.clone()
    add_to_options(clone.model_options.setdefault("transformer_options", {}), name, strength)
    return clone


def is_remote(patcher: Any) -> bool:
    return isinstance(getattr(getattr(patcher, "model", None), "diffusion_model", None), RemoteDiffusionModel)
