"""LoraLoader / LoraLoaderModelOnly on the proxies.

ComfyUI's LoraLoader reads the LoRA file and hands only its tensors to comfy.sd.load_lora_for_models,
which patches weights by key; the proxies have no local weights, so those patches would be silently
dropped. The pack wraps two ComfyUI functions (once, delegating everything else unchanged): it
remembers which file a loaded LoRA dict came from, and for a proxy it adds (file name, strength) to the
proxy's LoRA stack instead, which the services apply beside their shared weights.
Imported lazily: this module needs ComfyUI.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from typing import Any

import comfy.sd
import comfy.utils
import folder_paths

from .clip_proxy import ClipProxy
from .errors import LunaStackError
from .lora_stack import lora_name
from .model_proxy import is_remote, with_lora

_REMEMBERED = 4  # LoRA dicts kept by identity (LoraLoader caches its last one, so identity holds)
_loaded: OrderedDict[int, tuple[str, Any]] = OrderedDict()


def _remember(path: str, sd: Any) -> None:
    lora_dirs = [os.path.realpath(d) for d in folder_paths.get_folder_paths("loras")]
    real = os.path.realpath(path)
    if any(os.path.commonpath([real, d]) == d for d in lora_dirs):
        _loaded[id(sd)] = (lora_name(real, lora_dirs), sd)
        _loaded.move_to_end(id(sd))
        while len(_loaded) > _REMEMBERED:
            _loaded.popitem(last=False)


def _name_of(lora: Any) -> str:
    entry = _loaded.get(id(lora))
    if entry is None or entry[1] is not lora:
        raise LunaStackError(
            "a LoRA for a shared (Luna Stack) model must come from a file in ComfyUI's loras folder "
            "(LoraLoader / LoraLoaderModelOnly); the same file must exist under the stack's loras/ root"
        )
    return entry[0]


def install() -> None:
    """Wrap comfy.utils.load_torch_file and comfy.sd.load_lora_for_models (idempotent)."""
    if getattr(comfy.sd.load_lora_for_models, "_luna_stack", False):
        return
    load_file = comfy.utils.load_torch_file
    load_lora = comfy.sd.load_lora_for_models

    @functools.wraps(load_file)
    def load_torch_file(ckpt: Any, *args: Any, **kwargs: Any) -> Any:
        out = load_file(ckpt, *args, **kwargs)
        if isinstance(ckpt, str | os.PathLike):
            _remember(os.fspath(ckpt), out[0] if isinstance(out, tuple) else out)
        return out

    @functools.wraps(load_lora)
    def load_lora_for_models(
        model: Any, clip: Any, lora: Any, strength_model: float, strength_clip: float
    ) -> Any:
        remote_model, remote_clip = is_remote(model), isinstance(clip, ClipProxy)
        if not (remote_model or remote_clip):
            return load_lora(model, clip, lora, strength_model, strength_clip)
        name = _name_of(lora)
        if remote_model and strength_model != 0:
            model.model.diffusion_model.services.require_lora("unet", name)
        if remote_clip and strength_clip != 0:
            clip.services.require_lora("clip", name)
        local_model = None if remote_model else model
        local_clip = None if remote_clip else clip
        new_model, new_clip = (None, None)
        if local_model is not None or local_clip is not None:
            new_model, new_clip = load_lora(local_model, local_clip, lora, strength_model, strength_clip)
        if remote_model:
            new_model = with_lora(model, name, strength_model)
        if remote_clip:
            new_clip = clip.with_lora(name, strength_clip)
        return new_model, new_clip

    load_lora_for_models._luna_stack = True  # type: ignore[attr-defined]
    comfy.utils.load_torch_file = load_torch_file
    comfy.sd.load_lora_for_models = load_lora_for_models
