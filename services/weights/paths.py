"""Model files live under configured roots in ComfyUI's layout; no request may name a file outside them.

Every model kind (checkpoints, vae, clip, unet, loras, embeddings) is found here, with one confinement:
a name is joined to a folder of a root, every symlink on the way is resolved, and the real file must
lie under one of the roots (else PathNotAllowed, 403). A symlink loop is a 403 too, a name longer than a
file system allows a 400, never an OSError. `list` offers only files that `resolve` would load. No
message carries an absolute host path: files are named as the request named them, or relative to
their root (`vae/x.safetensors`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath

from luna_stack.wire.errors import BadRequest, LunaError, ModelLoadError, PathNotAllowed, UnknownModel

MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf")
FOLDERS = ("checkpoints", "vae", "clip", "text_encoders", "unet", "diffusion_models", "loras", "embeddings")
MAX_NAME_CHARS = 1024  # a whole name; Linux's PATH_MAX is 4096 bytes, NAME_MAX 255 per component
MAX_COMPONENT_BYTES = 255


class ModelRoots:
    def __init__(self, roots: Iterable[str | os.PathLike[str]]):
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def _root_of(self, real: Path) -> Path | None:
        return next((r for r in self.roots if real == r or r in real.parents), None)

    def _inside(self, path: Path) -> bool:
        return self._root_of(path) is not None

    def _checked_name(self, name: object) -> PurePath:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise UnknownModel("empty or invalid model name")
        parts = PurePath(name).parts
        longest = max((len(p.encode(errors="replace")) for p in parts), default=0)
        if len(name) > MAX_NAME_CHARS or longest > MAX_COMPONENT_BYTES:
            raise BadRequest(
                f"model name of {len(name)} characters is too long",
                hint=f"at most {MAX_COMPONENT_BYTES} bytes per folder or file name, {MAX_NAME_CHARS} in all",
            )
        candidate = PurePath(name)
        if candidate.is_absolute() or ".." in parts:
            real = self._real(Path(name), name) if candidate.is_absolute() else None
            if real is None or not self._inside(real):
                raise PathNotAllowed(
                    f"model path {shown(name)} is outside the model roots",
                    hint="name a file relative to a models folder, e.g. vae/x.safetensors",
                )
        return candidate

    def _real(self, path: Path, name: str) -> Path | None:
        """`path` with every symlink resolved, None when nothing is there."""
        try:
            return Path(os.path.realpath(path, strict=True))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _path_error(exc, name) from None

    def _confined(self, path: Path, name: str) -> Path | None:
        """The real file `path` names, None when there is none; PathNotAllowed when it leads outside."""
        real = self._real(path, name)
        if real is None:
            return None
        if not self._inside(real):
            raise PathNotAllowed(
                f"model path {shown(name)} resolves outside the model roots (a symlink leaves them)",
                hint="model files and the links to them must stay under the configured model_roots",
            )
        return real if real.is_file() else None

    def find(
        self,
        name: str,
        folders: Iterable[str],
        *,
        suffixes: tuple[str, ...] = MODEL_SUFFIXES,
        any_suffix: bool = True,
        subfolders: bool = False,
        at_root: bool = True,
    ) -> Path | None:
        """The real path of `name` (a file name or a relative path) in `folders` of every root, trying
        `name` and `name + suffix` for each of `suffixes`; None when there is no such file.

        any_suffix=False accepts only files ending in one of `suffixes`; subfolders searches every folder
        below each folder too (ComfyUI's embeddings lookup); at_root also tries `name` relative to the
        root itself (`vae/x.safetensors`). Absolute paths and `..` that leave the roots, and symlinks
        leading out of them, raise PathNotAllowed."""
        candidate = self._checked_name(name)
        folders = list(folders)
        for root in self.roots:
            bases = [root / f for f in folders] + ([root] if at_root else [])
            for base in bases:
                for folder in self._walk(base) if subfolders else [base]:
                    path = folder / candidate
                    options = [path] + [path.with_name(path.name + s) for s in suffixes]
                    for option in options:
                        real = self._confined(option, name)
                        if real is not None and (any_suffix or real.suffix in suffixes):
                            return real
        return None

    def resolve(self, name: str, folders: Iterable[str]) -> Path:
        """Like `find`, but a missing file raises UnknownModel listing what is available."""
        folders = list(folders)
        found = self.find(name, folders)
        if found is not None:
            return found
        available = self.list(folders)
        raise UnknownModel(
            f"model {shown(name)} not found in {', '.join(folders)} under the model roots",
            hint=f"available: {', '.join(available[:20]) or 'none'}",
        )

    def _walk(self, base: Path) -> Iterator[Path]:
        """`base` and the folders below it, symlinked folders followed as ComfyUI does while their real
        path stays inside the roots; each real folder once (a symlink loop cannot recurse); `.git` skipped."""
        seen: set[Path] = set()
        pending = [base]
        while pending:
            folder = pending.pop()
            try:
                real = folder.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if real in seen or not real.is_dir() or not self._inside(real):
                continue
            seen.add(real)
            yield folder
            try:
                children = sorted(folder.iterdir(), reverse=True)
            except OSError:
                continue
            pending.extend(c for c in children if c.name != ".git" and c.is_dir())

    def list(self, folders: Iterable[str]) -> list[str]:
        """Model file names relative to their folder (`x.safetensors`, `sub/y.gguf`), sorted: the names
        ComfyUI's loaders show for the same folder (`.git` skipped, suffixes in any case), limited to files
        whose real path, symlinks resolved, is a regular file inside the roots."""
        names: set[str] = set()
        for root in self.roots:
            for folder in folders:
                base = root / folder
                for sub in self._walk(base):
                    try:
                        entries = list(sub.iterdir())
                    except OSError:
                        continue
                    for path in entries:
                        if path.suffix.lower() in MODEL_SUFFIXES and self._loadable(path):
                            names.add(path.relative_to(base).as_posix())
        return sorted(names)

    def _loadable(self, path: Path) -> bool:
        try:
            return self._confined(path, path.name) is not None
        except LunaError:
            return False


def shown(name: str) -> str:
    """A requested name as messages quote it: shortened, and an absolute path only by its file name
    (so an answer never spells out a host path, not even one the client sent)."""
    if PurePath(name).is_absolute():
        return repr(".../" + PurePath(name).name)
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _path_error(exc: OSError, name: str) -> LunaError:
    if exc.errno == errno.ELOOP:
        return PathNotAllowed(
            f"model path {shown(name)} is a symlink loop", hint="fix the symbolic links in the models folder"
        )
    if exc.errno == errno.ENAMETOOLONG:
        return BadRequest(f"model name {shown(name)} is too long for the file system")
    return ModelLoadError(f"model path {shown(name)} cannot be read: {exc.strerror}")
