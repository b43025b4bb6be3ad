"""Textual-inversion embeddings (`embedding:name` in a prompt), safetensors only, from embeddings/ dirs.

Lookup follows ComfyUI's load_embed: `name` or `name.safetensors` in an embeddings directory or any
folder below it, never outside it. Pickled `.pt` / `.bin` files are not loaded (no unpickling here);
they are reported like a missing embedding. The tensor for an encoder is the one keyed by its name
(`clip_l` / `clip_g`), else a kohya bundle (`bundle_emb.*.string_to_param.*`), else the file's first.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest

EMBEDDING_SUFFIXES = (".safetensors", ".sft")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, width] float32
    sha256: str


class EmbeddingStore:
    """Embeddings under `embeddings/` of every model root, found through ModelRoots like every other
    model file: a symlink that leaves the roots is refused (403), not loaded."""

    def __init__(self, roots: ModelRoots):
        self.roots = roots
        self._cache: dict[tuple[Path, float, str], Embedding] = {}
        self._lock = threading.Lock()

    def find(self, name: str) -> Path | None:
        folders = ["embeddings"]
        return self.roots.find(
            name, folders, suffixes=EMBEDDING_SUFFIXES, any_suffix=False, subfolders=True, at_root=False
        )

    def load(self, name: str, key: str) -> Embedding | None:
        """The embedding for encoder `key` ("clip_l" / "clip_g"), or None if there is no such file."""
        path = self.find(name)
        if path is None:
            return None
        cache_key = (path, path.stat().st_mtime, key)
        with self._lock:
            if cache_key in self._cache:
                return self._cache[cache_key]
        try:
            raw = path.read_bytes()
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise BadRequest(f"embedding {name!r} is not a readable safetensors file: {reason}") from None
        vectors = _pick(tensors, key)
        if vectors is None or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
            raise BadRequest(f"embedding {name!r} holds no [tokens, width] float tensor")
        embedding = Embedding(
            name, vectors.reshape(-1, vectors.shape[-1]).float(), hashlib.sha256(raw).hexdigest()
        )
        with self._lock:
            self._cache[cache_key] = embedding
        return embedding


def _pick(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    if key in tensors:
        return tensors[key]
    for suffix in (".string_to_param.*", f".{key}"):
        bundle = [t for k, t in tensors.items() if k.startswith("bundle_emb.") and k.endswith(suffix)]
        if bundle:
            return torch.cat(bundle, dim=0)
    return next(iter(tensors.values()), None)
