"""Model names as ComfyUI's own loaders show them, and the services' names for the same files.

A service lists a file by its path under a model root (`checkpoints/sd15.safetensors`); ComfyUI lists it
relative to its folder (`sd15.safetensors`, `subdir/x.safetensors`), and folds `clip/` into
`text_encoders` and `unet/` into `diffusion_models`. The shared loaders show ComfyUI's names, so a
workflow's names are the same with either loader; the prefixed names saved by earlier versions of the pack
still resolve.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Folder:
    comfy: str  # ComfyUI's folder name (folder_paths)
    stack: tuple[str, ...]  # the folders under a service's model roots holding those files
    kind: str  # the service that lists them
    legacy: tuple[str, ...] = ()  # other folders whose prefixed names earlier versions of the loader listed

    def names(self, served: Iterable[str]) -> list[str]:
        """ComfyUI's names for the files among `served` (service names), sorted as ComfyUI sorts them."""
        out = set()
        for name in served:
            folder, _, rest = name.partition("/")
            if folder in self.stack and rest:
                out.add(rest)
        return sorted(out)

    def service_name(self, name: str, served: Iterable[str]) -> str | None:
        """The service's name for ComfyUI's `name` (or for an old prefixed name); None if not served."""
        served = set(served)
        for folder in self.stack:
            if f"{folder}/{name}" in served:
                return f"{folder}/{name}"
        folder, _, rest = name.partition("/")
        if folder in self.stack + self.legacy and rest and name in served:
            return name  # saved by an earlier version of the pack
        return None

    def label(self, name: str) -> str:
        return f"{self.comfy}/{name}"


# `stack` is in ComfyUI's search order, so a name in two folders means the same file on both sides.
CHECKPOINTS = Folder("checkpoints", ("checkpoints",), "unet")
DIFFUSION_MODELS = Folder("diffusion_models", ("unet", "diffusion_models"), "unet", ("checkpoints",))
TEXT_ENCODERS = Folder("text_encoders", ("text_encoders", "clip"), "clip", ("checkpoints",))
VAE = Folder("vae", ("vae",), "vae", ("checkpoints",))
