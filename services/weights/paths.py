"""Model files live under configured roots in ComfyUI's layout; no request may name a file outside them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from luna_stack.wire.errors import PathNotAllowed, UnknownModel

MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf")
FOLDERS = ("checkpoints", "vae", "clip", "text_encoders", "unet", "diffusion_models", "loras", "embeddings")


class ModelRoots:
    def __init__(self, roots: Iterable[str | os.PathLike[str]]):
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def _inside(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.roots)

    def resolve(self, name: str, folders: Iterable[str]) -> Path:
        """Find `name` (a file name, or a relative path) in the given folders of every root.

        Absolute paths and `..` that leave the roots are refused, symlinks included (resolved first).
        """
        if not name or "\x00" in name:
            raise UnknownModel("empty model name")
        candidate = Path(name)
        if candidate.is_absolute() or ".." in candidate.parts:
            resolved = candidate.resolve() if candidate.is_absolute() else None
            if resolved is None or not self._inside(resolved):
                raise PathNotAllowed(
                    f"model path {name!r} is outside the model roots",
                    hint="name a file under " + ", ".join(str(r) for r in self.roots),
                )
        folders = list(folders)
        searched = []
        for root in self.roots:
            for base in [root / f for f in folders] + [root]:
                path = (base / candidate).resolve()
                if not self._inside(path):
                    raise PathNotAllowed(f"model path {name!r} resolves outside the model roots")
                searched.append(base)
                if path.is_file():
                    return path
                for suffix in MODEL_SUFFIXES:
                    with_suffix = path.with_name(path.name + suffix)
                    if with_suffix.is_file() and self._inside(with_suffix.resolve()):
                        return with_suffix.resolve()
        available = self.list(folders)
        raise UnknownModel(
            f"model {name!r} not found in {', '.join(folders)} under the model roots",
            hint=f"available: {', '.join(available[:20]) or 'none'}",
        )

    def list(self, folders: Iterable[str]) -> list[str]:
        """Model file names relative to their folder (`x.safetensors`, `sub/y.gguf`), sorted: the names
        ComfyUI's loaders show for the same folder (symlinked folders followed, `.git` skipped, suffixes
        in any case), limited to files this service reads and that resolve inside the roots."""
        names: set[str] = set()
        for root in self.roots:
            for folder in folders:
                base = root / folder
                for dirpath, subdirs, files in os.walk(base, followlinks=True):
                    subdirs[:] = [d for d in subdirs if d != ".git"]
                    for file in files:
                        path = Path(dirpath) / file
                        if path.suffix.lower() in MODEL_SUFFIXES and self._inside(path.resolve()):
                            names.add(path.relative_to(base).as_posix())
        return sorted(names)
