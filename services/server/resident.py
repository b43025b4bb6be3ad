"""The models a service holds, by canonical name: loaded once (concurrent first requests share the load),
from the preload list or on first use, listed, and unloaded on request.

The set is bounded (`max_models`, `max_model_gb`): making room unloads the least recently used model that
is not on the preload list; when only preloaded models are left to unload, the new load is refused with
the setting to raise. Requests that already hold an unloaded model still finish with it."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from luna_stack.server.executor import GpuExecutor
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest, LimitExceeded, UnknownModel

M = TypeVar("M")
_MAX_NAMES = 256
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBudget:
    max_models: int
    max_bytes: int  # 0: no limit


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
        budget: ModelBudget,
        size_of: Callable[[M], int],
    ):
        self.kind = kind
        self.roots = roots
        self.folders = tuple(folders)
        self._executor = executor
        self._load = load  # runs on the compute thread with the canonical name
        self._size_of = size_of
        self.load_on_demand = load_on_demand
        self.budget = budget
        self.pinned: set[str] = set()  # canonical names of the preload list: never evicted
        self._models: OrderedDict[str, M] = OrderedDict()  # least recently used first
        self._locks: dict[str, asyncio.Lock] = {}
        # Request name -> canonical name, for resident models: resolving a name walks the roots on disk
        # (0.2-0.7 ms per step in a py-spy profile of the unet service on the 2-core CPU host), too slow
        # for every step. A name keeps meaning the file it named while resident.
        self._names: dict[str, str] = {}
        self.evictions = 0

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
        key = self._names.get(name)
        if key is None or key not in self._models:
            key = self.canonical(name)
        if key in self._models:
            if len(self._names) < _MAX_NAMES:  # spellings of a name are a client's choice: bounded
                self._names[name] = key
            self._models.move_to_end(key)
            return self._models[key]
        if not (preload or self.load_on_demand):
            raise UnknownModel(
                f"{self.kind} model {name!r} is not loaded and load_on_demand is off",
                hint=f"add it to {self.kind}.preload (LUNA_{self.kind.upper()}_PRELOAD)",
            )
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._models:
                self._make_room(key, incoming=1)
                model = await self._executor.run(self._load, key)
                self._models[key] = model
                if preload:
                    self.pinned.add(key)
                self._make_room(key, incoming=0)
        self._models.move_to_end(key)
        return self._models[key]

    def _resident_bytes(self) -> int:
        return sum(self._size_of(m) for m in self._models.values())

    def _make_room(self, key: str, *, incoming: int) -> None:
        """Unload least recently used, unpinned models until `incoming` more models and the resident
        bytes fit the budget (bytes are known once loaded: this runs again after each load); refuse,
        dropping `key` if it was just loaded, when they cannot."""
        budget = self.budget

        def over() -> bool:
            too_many = len(self._models) + incoming > budget.max_models
            return too_many or bool(budget.max_bytes and self._resident_bytes() > budget.max_bytes)

        while over():
            victim = next((k for k in self._models if k != key and k not in self.pinned), None)
            if victim is None:
                self._models.pop(key, None)
                raise LimitExceeded(
                    f"cannot make {self.kind} model {key!r} resident: {len(self._models)} models "
                    f"({self._resident_bytes() / 2**30:.1f} GiB) are resident "
                    f"and none can be unloaded",
                    hint="raise max_models / max_model_gb (LUNA_MAX_MODELS, LUNA_MAX_MODEL_GB) or unload one",
                )
            del self._models[victim]
            self._forget(victim)
            self.evictions += 1
            log.info("%s: unloaded %s (least recently used) to make room for %s", self.kind, victim, key)

    def __iter__(self) -> Iterator[M]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def available(self) -> list[str]:
        return [f"{folder}/{n}" for folder in self.folders for n in self.roots.list([folder])]

    async def unload(self, name: str) -> bool:
        key = self.canonical(name)
        self.pinned.discard(key)
        self._forget(key)
        return self._models.pop(key, None) is not None

    def _forget(self, key: str) -> None:
        self._names = {name: k for name, k in self._names.items() if k != key}
