"""The pack's nodes. Loaders return proxies ComfyUI's standard nodes accept; the Luna-compatible nodes
(for users of the Luna daemon) call the services directly.

Loader lists hold ComfyUI's own names for the files the services serve (names.py); every model input is
checked when a prompt is queued (VALIDATE_INPUTS, which replaces ComfyUI's list check), so a service that
is down or lacks the file gives one sentence in the UI instead of "Value not in list".
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from . import names
from .errors import LunaStackError, missing_model
from .names import Folder
from .remote import Services, services
from .vae_proxy import VaeProxy
from .wire import SIZE_KEYS, conditioning, latent, size_params

log = logging.getLogger("luna_stack.comfy")
CATEGORY = "Luna Stack"
NONE = "none"


def _choices(folder: Folder) -> list[str]:
    """A loader's list: ComfyUI's names for the files the service serves. While the service is down, the
    names ComfyUI itself sees in that folder (the same names when the models folder is shared), so a saved
    workflow keeps its choice; queueing it then says what is wrong."""
    try:
        return services().names(folder)
    except LunaStackError as exc:
        log.warning("Luna Stack: %s", exc)
        return _local_names(folder.comfy)


def _local_names(comfy_folder: str) -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI
        return []
    return folder_paths.get_filename_list(comfy_folder)


def _service_choices(kind: str, *folders: str) -> list[str]:
    """Service names (`vae/x.safetensors`) under the given folders, for the Luna-compatible nodes."""
    try:
        served = services().models(kind)
    except LunaStackError as exc:
        log.warning("Luna Stack: %s", exc)
        return []
    return [n for n in served if not folders or n.split("/", 1)[0] in folders]


def _service_problem(kind: str, name: str, *folders: str) -> str | bool:
    """True when the service serves `name` (its own name, or a bare file name in one of the folders)."""
    svc = services()
    try:
        for fresh in (False, True):  # a cached list may predate the file: ask again before saying no
            served = svc.models(kind, fresh)
            if name in served or any(f"{folder}/{name}" in served for folder in folders):
                return True
    except LunaStackError as exc:
        return str(exc)
    listed = [n for n in served if n.split("/", 1)[0] in folders]
    label = name if "/" in name else f"{folders[0]}/{name}"
    return str(missing_model(kind, svc.settings.describe(kind), label, listed))


def _valid(problem: str | None) -> str | bool:
    """VALIDATE_INPUTS' answer: True, or the sentence ComfyUI shows."""
    return True if problem is None else problem


def _clip_proxy(svc: Services, model: str, family: str | None = None) -> Any:
    from .clip_proxy import ClipProxy

    served = svc.clip_family(model, family if family in ("flux", "sd3") else None)
    if family is not None and family != served:
        raise LunaStackError(f"CLIP model {model!r} is {served}, not {family}")
    return ClipProxy(svc, model, served)


def _model_proxy(svc: Services, model: str) -> Any:
    from .model_proxy import remote_model

    return remote_model(svc, model, svc.unet_load(model))


# -- loaders (proxies for ComfyUI's standard nodes) ----------------------------------------------------------
CHECKPOINT_KINDS = ("unet", "clip", "vae")  # a checkpoint's MODEL, CLIP and VAE come from all three


class SharedCheckpointLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    DESCRIPTION = "MODEL, CLIP and VAE of a checkpoint served by Luna Stack (shared, nothing loaded here)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ckpt_name": (_choices(names.CHECKPOINTS),)}}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name: str) -> str | bool:
        return _valid(services().problem(names.CHECKPOINTS, ckpt_name, CHECKPOINT_KINDS))

    def load(self, ckpt_name: str) -> tuple:
        return load_checkpoint(services(), ckpt_name)


def load_checkpoint(svc: Services, ckpt_name: str) -> tuple:
    """MODEL, CLIP and VAE proxies for ComfyUI's checkpoint name (or an old `checkpoints/...` name)."""
    unet, clip, vae = (svc.resolve(names.CHECKPOINTS, ckpt_name, kind) for kind in CHECKPOINT_KINDS)
    return _model_proxy(svc, unet), _clip_proxy(svc, clip), VaeProxy(svc, vae)


class SharedVAELoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae_name": (_choices(names.VAE),)}}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str) -> str | bool:
        return _valid(services().problem(names.VAE, vae_name))

    def load(self, vae_name: str) -> tuple:
        svc = services()
        return (VaeProxy(svc, svc.resolve(names.VAE, vae_name)),)


class SharedCLIPLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = (
        "SD1.5: clip_l. SDXL: clip_l + clip_g (or one checkpoint holding both). Flux: clip_l + t5xxl. "
        "SD3: clip_l + t5xxl or clip_g + t5xxl (DualCLIPLoader's type sd3), a lone t5xxl."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        listed = _choices(names.TEXT_ENCODERS)
        return {
            "required": {
                "clip_name1": (listed,),
                "clip_name2": ([NONE, *listed],),
                "type": (["sd15", "sdxl", "flux", "sd3"],),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1: str, clip_name2: str) -> str | bool:
        for name in (clip_name1, clip_name2):
            problem = None if name == NONE else services().problem(names.TEXT_ENCODERS, name)
            if problem is not None:
                return problem
        return True

    def load(self, clip_name1: str, clip_name2: str, type: str) -> tuple:
        return (load_clip(services(), [n for n in (clip_name1, clip_name2) if n != NONE], type),)


class SharedTripleCLIPLoader:
    """TripleCLIPLoader's role: SD3's clip_l + clip_g + t5xxl from the CLIP service."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "SD3: clip_l + clip_g + t5xxl."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        listed = _choices(names.TEXT_ENCODERS)
        return {"required": {"clip_name1": (listed,), "clip_name2": (listed,), "clip_name3": (listed,)}}

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1: str, clip_name2: str, clip_name3: str) -> str | bool:
        for name in (clip_name1, clip_name2, clip_name3):
            problem = services().problem(names.TEXT_ENCODERS, name)
            if problem is not None:
                return problem
        return True

    def load(self, clip_name1: str, clip_name2: str, clip_name3: str) -> tuple:
        return (load_clip(services(), [clip_name1, clip_name2, clip_name3], "sd3"),)


def load_clip(svc: Services, clip_names: list[str], family: str | None) -> Any:
    """A CLIP proxy for one text encoder file (or a checkpoint) or an SDXL pair, by ComfyUI's names."""
    name = "+".join(svc.resolve(names.TEXT_ENCODERS, n) for n in clip_names)
    return _clip_proxy(svc, name, family)


class SharedUNetLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"unet_name": (_choices(names.DIFFUSION_MODELS),)}}

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name: str) -> str | bool:
        return _valid(services().problem(names.DIFFUSION_MODELS, unet_name))

    def load(self, unet_name: str) -> tuple:
        svc = services()
        return (_model_proxy(svc, svc.resolve(names.DIFFUSION_MODELS, unet_name)),)


# -- Luna-compatible nodes (service names: `vae/x.safetensors`, `checkpoints/y.safetensors`) ----------------
VAE_FOLDERS = ("vae", "checkpoints")


def _vae_input() -> tuple:
    return (_service_choices("vae", *VAE_FOLDERS),)


class _ValidatesVae:
    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str) -> str | bool:
        return _service_problem("vae", vae_name, *VAE_FOLDERS)


class _ValidatesClip:
    @classmethod
    def VALIDATE_INPUTS(cls, clip_name: str) -> str | bool:
        return _service_problem("clip", clip_name, "checkpoints", "clip", "text_encoders")


def _tile_inputs(size: int, overlap: int) -> dict:
    return {
        "tile_size": ("INT", {"default": size, "min": 64, "max": 4096, "step": 32}),
        "overlap": ("INT", {"default": overlap, "min": 0, "max": 4096, "step": 32}),
    }


def _tiles(tile_size: int, overlap: int, unit: int) -> dict[str, int]:
    return {"tile_x": tile_size // unit, "tile_y": tile_size // unit, "overlap": overlap // unit}


class LunaSharedVAEDecode(_ValidatesVae):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",), "vae_name": _vae_input()}}

    def decode(self, samples: dict, vae_name: str) -> tuple:
        return (VaeProxy(services(), vae_name).decode(samples["samples"]),)


class LunaSharedVAEEncode(_ValidatesVae):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"pixels": ("IMAGE",), "vae_name": _vae_input()}}

    def encode(self, pixels: torch.Tensor, vae_name: str) -> tuple:
        return (latent(VaeProxy(services(), vae_name).encode(pixels)),)


class LunaSharedVAEDecodeTiled(_ValidatesVae):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",), "vae_name": _vae_input(), **_tile_inputs(512, 64)}}

    def decode(self, samples: dict, vae_name: str, tile_size: int, overlap: int) -> tuple:
        vae = VaeProxy(services(), vae_name)
        return (vae.decode_tiled(samples["samples"], **_tiles(tile_size, overlap, vae.downscale_ratio)),)


class LunaSharedVAEEncodeTiled(_ValidatesVae):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"pixels": ("IMAGE",), "vae_name": _vae_input(), **_tile_inputs(512, 64)}}

    def encode(self, pixels: torch.Tensor, vae_name: str, tile_size: int, overlap: int) -> tuple:
        vae = VaeProxy(services(), vae_name)
        return (latent(vae.encode_tiled(pixels, **_tiles(tile_size, overlap, 1))),)


def _clip_input() -> tuple:
    return (_service_choices("clip"),)


class LunaSharedCLIPEncode(_ValidatesClip):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"clip_name": _clip_input(), "text": ("STRING", {"multiline": True})}}

    def encode(self, clip_name: str, text: str) -> tuple:
        cond, pooled, _ = services().clip_encode(clip_name, {"text": text})
        return (conditioning(cond, pooled),)


class LunaSharedCLIPEncodeSDXL(_ValidatesClip):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = ("INT", {"default": 1024, "min": 0, "max": 16384})
        crop = ("INT", {"default": 0, "min": 0, "max": 16384})
        sizes = {k: (crop if k.startswith("crop") else size) for k in SIZE_KEYS}
        text = ("STRING", {"multiline": True})
        return {"required": {"clip_name": _clip_input(), **sizes, "text_g": text, "text_l": text}}

    def encode(self, clip_name: str, text_g: str, text_l: str, **sizes: int) -> tuple:
        sizes = size_params(sizes)
        cond, pooled, _ = services().clip_encode(clip_name, {"text_g": text_g, "text_l": text_l, **sizes})
        return (conditioning(cond, pooled, sizes),)


class LunaSharedCLIPEncodeDual(_ValidatesClip):
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        text = ("STRING", {"multiline": True})
        return {"required": {"clip_name": _clip_input(), "positive": text, "negative": text}}

    def encode(self, clip_name: str, positive: str, negative: str) -> tuple:
        params = {"model": clip_name, "positive": {"text": positive}, "negative": {"text": negative}}
        out, _ = services().call("clip", "encode_dual", None, params)
        return tuple(
            conditioning(out[f"{side}_cond"], out[f"{side}_pooled"]) for side in ("positive", "negative")
        )


class LunaDaemonStatus:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    FUNCTION = "status"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls) -> float:
        return float("nan")  # always re-run: the status is live

    def status(self) -> dict:
        text = format_status(services().status())
        return {"ui": {"text": [text]}, "result": (text,)}


def format_status(status: dict[str, Any]) -> str:
    """One block per service: models, queue depth, requests; GPU memory where NVML sees a GPU."""
    lines = []
    for kind, body in status.items():
        if "error" in body:
            lines.append(f"{kind}: DOWN - {body['error']}")
            continue
        models = ", ".join(m.get("name", "?") for m in body.get("models", [])) or "none loaded"
        lines.append(f"{kind}: models: {models}; queue {body.get('queue_depth', 0)}")
        extra = {k: body[k] for k in ("requests", "gpu") if k in body}
        if extra:
            lines.append("  " + json.dumps(extra, default=str)[:400])
    return "\n".join(lines)


NODE_CLASS_MAPPINGS = {
    "LunaStackCheckpointLoader": SharedCheckpointLoader,
    "LunaStackVAELoader": SharedVAELoader,
    "LunaStackCLIPLoader": SharedCLIPLoader,
    "LunaStackTripleCLIPLoader": SharedTripleCLIPLoader,
    "LunaStackUNetLoader": SharedUNetLoader,
    "LunaSharedVAEDecode": LunaSharedVAEDecode,
    "LunaSharedVAEEncode": LunaSharedVAEEncode,
    "LunaSharedVAEDecodeTiled": LunaSharedVAEDecodeTiled,
    "LunaSharedVAEEncodeTiled": LunaSharedVAEEncodeTiled,
    "LunaSharedCLIPEncode": LunaSharedCLIPEncode,
    "LunaSharedCLIPEncodeSDXL": LunaSharedCLIPEncodeSDXL,
    "LunaSharedCLIPEncodeDual": LunaSharedCLIPEncodeDual,
    "LunaDaemonStatus": LunaDaemonStatus,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LunaStackCheckpointLoader": "Shared Checkpoint Loader (Luna Stack)",
    "LunaStackVAELoader": "Shared VAE Loader (Luna Stack)",
    "LunaStackCLIPLoader": "Shared CLIP Loader (Luna Stack)",
    "LunaStackTripleCLIPLoader": "Shared Triple CLIP Loader (Luna Stack)",
    "LunaStackUNetLoader": "Shared UNet Loader (Luna Stack)",
    "LunaSharedVAEDecode": "Luna Shared VAE Decode",
    "LunaSharedVAEEncode": "Luna Shared VAE Encode",
    "LunaSharedVAEDecodeTiled": "Luna Shared VAE Decode (Tiled)",
    "LunaSharedVAEEncodeTiled": "Luna Shared VAE Encode (Tiled)",
    "LunaSharedCLIPEncode": "Luna Shared CLIP Encode",
    "LunaSharedCLIPEncodeSDXL": "Luna Shared CLIP Encode (SDXL)",
    "LunaSharedCLIPEncodeDual": "Luna Shared CLIP Encode (Dual)",
    "LunaDaemonStatus": "Luna Daemon Status",
}
