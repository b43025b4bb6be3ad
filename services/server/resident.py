"""The models a service holds, by canonical name: loaded once (concurrent first requests share the load),
from the preload list or on first use, listed, and unloaded on request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from luna_stack.server.executor import GpuExecutor
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest, UnknownModel

M = TypeVar("M")


class ResidentModels(Generic[M]):
    def __init__(
        self,
        kind: str,
        roots: ModelRoots,
        folders: Sequence[str],
        executor: GpuExecutor,
        load: Callable[[str], M],
        *,
        load_on_demand: bool,
    ):
        self.kind = kind
        self.roots = roots
        self.folders = tuple(folders)
        self._executor = executor
        self._load = load  # runs on the compute thread with the canonical name
        self.load_on_demand = load_on_demand
        self._models: dict[str, M] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def canonical(self, name: str) -> str:
        """One name per file (or '+'-joined set of files): root-relative paths, sorted."""
        parts = []
        for part in name.split("+"):
            path = self.roots.resolve(part.strip(), self.folders)
            root = next(r for r in self.roots.roots if r in path.parents)
            parts.append(path.relative_to(root).as_posix())
        return "+".join(sorted(parts))

    async def get(self, name: Any, *, preload: bool = False) -> M:
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise BadRequest(
                "params.model is required", hint=f"available: {', '.join(self.available()[:20])}"
            )
        if not isinstance(name, str):
            raise BadRequest("params.model must be a string")
        key = self.canonical(name)
        if key in self._models:
            return self._models[key]
        if not (preload or self.load_on_demand):
            raise UnknownModel(
                f"{self.kind} model {name!r} is not loaded and load_on_demand is off",
                hint=f"add it to {self.kind}.preload (LUNA_{self.kind.upper()}_PRELOAD)",
            )
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._models:
                self._models[key] = await self._executor.run(self._load, key)
        return self._models[key]

    def loaded(self, key: str) -> M:
        return self._models[key]

    def __iter__(self) -> Iterator[M]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def available(self) -> list[str]:
        return [f"{folder}/{n}" for folder in self.folders for n in self.roots.list([folder])]

    async def unload(self, name: str) -> bool:
        return self._models.pop(self.canonical(name), None) is not None
