"""A stand-in for ComfyUI's comfy.sd.CLIP: tokenizes locally with ComfyUI's own tokenizer (so ComfyUI's
prompt syntax and ours never disagree) and encodes the token ids on the CLIP service.

CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeFlux (two tokenize calls, add_dict guidance),
CLIPTextEncodeSD3, CLIPSetLastLayer and LoraLoader use exactly this surface.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from .errors import LunaStackError
from .lora_stack import LoraStack
from .remote import Services
from .wire import tokens_to_wire


class Tokenizer(Protocol):
    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict: ...


def comfy_tokenizer(family: str) -> Tokenizer:
    """ComfyUI's tokenizer for the family (imported lazily: only inside ComfyUI)."""
    import folder_paths

    embeddings = folder_paths.get_folder_paths("embeddings")
    if family == "sdxl":
        from comfy.sdxl_clip import SDXLTokenizer

        return SDXLTokenizer(embedding_directory=embeddings, tokenizer_data={})
    if family == "flux":  # token dict {"l", "t5xxl"}
        from comfy.text_encoders.flux import FluxTokenizer

        return FluxTokenizer(embedding_directory=embeddings, tokenizer_data={})
    if family == "sd3":  # token dict {"g", "l", "t5xxl"}
        from comfy.text_encoders.sd3_clip import SD3Tokenizer

        return SD3Tokenizer(embedding_directory=embeddings, tokenizer_data={})
    from comfy.sd1_clip import SD1Tokenizer

    return SD1Tokenizer(embedding_directory=embeddings, tokenizer_data={})


class _NoLocalWeights(torch.nn.Module):
    """cond_stage_model: ComfyUI builds LoRA key maps from its (empty) state dict."""

    def reset_clip_options(self) -> None:
        return None

    def set_clip_options(self, options: dict) -> None:
        return None


class ClipProxy:
    def __init__(
        self,
        services: Services,
        model: str,
        family: str,
        tokenizer: Tokenizer | None = None,
        lora: LoraStack = LoraStack(),
        layer_idx: int | None = None,
    ):
        self.services = services
        self.model = model
        self.family = family
        self.tokenizer = tokenizer if tokenizer is not None else comfy_tokenizer(family)
        self.lora = lora
        self.layer_idx = layer_idx
        self.cond_stage_model = _NoLocalWeights()
        self.tokenizer_options: dict[str, Any] = {}
        self.use_clip_schedule = False
        self.apply_hooks_to_conds = None

    def __repr__(self) -> str:
        return f"ClipProxy({self.model!r}, {self.family}, lora={self.lora.entries}, layer={self.layer_idx})"

    def clone(self) -> ClipProxy:
        out = copy.copy(self)
        out.tokenizer_options = dict(self.tokenizer_options)
        return out

    # -- patches ComfyUI nodes apply -------------------------------------------------------------------
    def clip_layer(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx

    def with_lora(self, name: str, strength: float) -> ClipProxy:
        out = self.clone()
        out.lora = self.lora.add(name, strength)
        return out

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        if patches:  # only reached if something bypassed the pack's LoraLoader hook
            raise LunaStackError(
                "weight patches cannot be applied to a shared CLIP; load LoRAs with LoraLoader "
                "(the pack forwards them by file name)"
            )
        return []

    def set_tokenizer_option(self, key: str, value: Any) -> None:
        self.tokenizer_options[key] = value

    def load_model(self) -> None:
        return None

    def get_sd(self) -> dict[str, torch.Tensor]:
        raise LunaStackError("a shared (Luna Stack) CLIP has no local weights to save")

    # -- tokenize locally, encode remotely ---------------------------------------------------------------
    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        options = {**self.tokenizer_options, **kwargs.pop("tokenizer_options", {})}
        if options:
            kwargs["tokenizer_options"] = options
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_tokens(self, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Size conditioning (CLIPTextEncodeSDXL's add_dict) stays local: the model reads it, not CLIP."""
        prompt: dict[str, Any] = {"tokens": tokens_to_wire(tokens)}
        if self.family in ("flux", "sd3"):  # a Flux pair may be loaded as sd3 (DualCLIPLoader type=sd3)
            prompt["family"] = self.family
        cond, pooled, _ = self.services.clip_encode(self.model, prompt, self.lora, self.layer_idx)
        return cond, pooled

    def encode_from_tokens(
        self, tokens: dict, return_pooled: bool | str = False, return_dict: bool = False
    ) -> Any:
        if return_pooled == "unprojected":
            raise LunaStackError("the shared CLIP service returns projected pooled outputs only")
        cond, pooled = self.encode_tokens(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(
        self,
        tokens: dict,
        unprojected: bool = False,
        add_dict: dict[str, Any] | None = None,
        show_pbar: bool = True,
    ) -> list:
        out = self.encode_from_tokens(
            tokens, return_pooled="unprojected" if unprojected else True, return_dict=True
        )
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]

    def encode(self, text: str) -> torch.Tensor:
        return self.encode_from_tokens(self.tokenize(text))
