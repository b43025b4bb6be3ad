"""Zero-edit mode: ComfyUI's own CheckpointLoaderSimple, UNETLoader, CLIPLoader, DualCLIPLoader and
VAELoader return the stack's shared models when the stack serves the named file, so existing workflows run
unchanged on shared models. When a service is down or lacks the file, the loader loads locally as usual and
says why in the log. LoraLoader needs no wrapping: on a shared MODEL / CLIP the pack's LoRA hook
(comfy_hooks.py) sends the LoRA by name.

Opt-in (settings.zero_edit_enabled: LUNA_ZERO_EDIT, or the pack's setting in ComfyUI's settings dialog),
read on every load, so switching it needs no restart. Imported lazily: this module needs ComfyUI.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes module (the pack's own is .nodes)

from . import names
from .names import Folder
from .nodes import CHECKPOINT_KINDS, _model_proxy, load_checkpoint, load_clip
from .remote import Services, services
from .settings import zero_edit_enabled
from .vae_proxy import VaeProxy

log = logging.getLogger("luna_stack.comfy")
SD15_CLIP_TYPE = "stable_diffusion"  # CLIPLoader's type for an SD1.x clip_l
SDXL_CLIP_TYPE = "sdxl"  # DualCLIPLoader's type for clip_l + clip_g


def settings_file() -> Path:
    """Where ComfyUI's frontend saves the (default user's) settings."""
    return Path(folder_paths.get_user_directory()) / "default" / "comfy.settings.json"


def enabled() -> bool:
    return zero_edit_enabled(settings_file=settings_file())


def _served(svc: Services, node: str, folder: Folder, name: str, kinds: tuple[str, ...] = ()) -> bool:
    problem = svc.problem(folder, name, kinds)
    if problem is not None:
        log.info("Luna Stack zero-edit: %s loads %r locally: %s", node, name, problem)
    return problem is None


def _local(node: str, name: str, why: str) -> None:
    log.info("Luna Stack zero-edit: %s loads %r locally: %s", node, name, why)


def shared_checkpoint(ckpt_name: str) -> tuple | None:
    svc = services()
    if not _served(svc, "CheckpointLoaderSimple", names.CHECKPOINTS, ckpt_name, CHECKPOINT_KINDS):
        return None
    return load_checkpoint(svc, ckpt_name)


def shared_unet(unet_name: str, weight_dtype: str = "default") -> tuple | None:
    svc = services()
    if not _served(svc, "UNETLoader", names.DIFFUSION_MODELS, unet_name):
        return None
    if weight_dtype != "default":
        log.info(
            "Luna Stack zero-edit: UNETLoader %r: the stack's precision applies, not %s",
            unet_name,
            weight_dtype,
        )
    return (_model_proxy(svc, svc.resolve(names.DIFFUSION_MODELS, unet_name)),)


def shared_clip(clip_name: str, type: str = SD15_CLIP_TYPE, device: str = "default") -> tuple | None:
    if type != SD15_CLIP_TYPE:
        _local("CLIPLoader", clip_name, f"the stack serves type {SD15_CLIP_TYPE} here, not {type}")
        return None
    svc = services()
    if not _served(svc, "CLIPLoader", names.TEXT_ENCODERS, clip_name):
        return None
    return (load_clip(svc, [clip_name], "sd15"),)


def shared_dual_clip(clip_name1: str, clip_name2: str, type: str, device: str = "default") -> tuple | None:
    pair = f"{clip_name1} + {clip_name2}"
    if type != SDXL_CLIP_TYPE:
        _local("DualCLIPLoader", pair, f"the stack serves type {SDXL_CLIP_TYPE} here, not {type}")
        return None
    svc = services()
    if not all(_served(svc, "DualCLIPLoader", names.TEXT_ENCODERS, n) for n in (clip_name1, clip_name2)):
        return None
    return (load_clip(svc, [clip_name1, clip_name2], "sdxl"),)


def shared_vae(vae_name: str) -> tuple | None:
    svc = services()
    if not _served(svc, "VAELoader", names.VAE, vae_name):
        return None
    return (VaeProxy(svc, svc.resolve(names.VAE, vae_name)),)


# ComfyUI's loader class, its method, and what answers instead when zero-edit mode is on.
ROUTES: tuple[tuple[str, str, Callable[..., tuple | None]], ...] = (
    ("CheckpointLoaderSimple", "load_checkpoint", shared_checkpoint),
    ("UNETLoader", "load_unet", shared_unet),
    ("CLIPLoader", "load_clip", shared_clip),
    ("DualCLIPLoader", "load_clip", shared_dual_clip),
    ("VAELoader", "load_vae", shared_vae),
)


def _route(method: Callable[..., Any], shared: Callable[..., tuple | None]) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def load(self: Any, *args: Any, **kwargs: Any) -> Any:
        if enabled():
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            out = shared(**{k: v for k, v in bound.arguments.items() if k != "self"})
            if out is not None:
                return out
        return method(self, *args, **kwargs)

    load._luna_zero_edit = True  # type: ignore[attr-defined]
    return load


def install() -> None:
    """Route ComfyUI's loaders (idempotent; each call checks whether the mode is on)."""
    for class_name, method_name, shared in ROUTES:
        cls = getattr(comfy_nodes, class_name, None)
        method = getattr(cls, method_name, None)
        if method is None:
            log.warning(
                "Luna Stack zero-edit: no %s.%s in this ComfyUI; it loads locally", class_name, method_name
            )
            continue
        if not getattr(method, "_luna_zero_edit", False):
            setattr(cls, method_name, _route(method, shared))
    if enabled():
        log.info("Luna Stack: zero-edit mode is on: ComfyUI's loaders use the shared models the stack serves")
