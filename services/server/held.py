"""Held tensors, service side: tensors a client sent once and refers to afterwards by id.

A sampling run sends the same conditioning (context, y) with every step; the client (client/held.py)
asks the service to keep it the first time and then sends only its id. The protocol (names in
wire/contract.py), resolved in routes.run_op before Service.run_op, so every family and both transports
(HTTP body, CUDA IPC) get it:

- params `"_held": {"keep": {name: id}, "use": {name: id}}`. `keep`: the request carries tensor `name`;
  once the request has succeeded the service keeps a copy of it on its device under (client, id) (a copy:
  IPC inputs are views into buffers the client reuses). `use`: the request leaves `name` out and the
  service puts the tensor it keeps under (client, id) in its place.
- the reply's params carry `"_held": {"kept": [name, ...]}`: the names actually kept. A tensor over the
  per-client budget is not kept, and the request still succeeds.
- a `use` id the service does not hold for this client (restarted, evicted, idle, another client's id) is
  a 409 `unknown_reference`; the client then sends the tensors themselves again.

A request carrying `_held` reaches the family with all its tensors on the service's device, so held
requests (the pack's every step) batch with one another without mixing host and device tensors.

Bounds: `held_mb_per_client` and `held_mb` in total (least recently used entries dropped first, never an
entry the same request keeps), clients that sent nothing for `held_idle_s` are dropped; an entry counts
at least MIN_ENTRY_BYTES, so a flood of tiny tensors cannot pile up entries within the byte budget.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from luna_stack.config import CoreSettings
from luna_stack.wire.contract import HELD_ID_CHARS, HELD_KEEP, HELD_PARAM, HELD_USE
from luna_stack.wire.errors import BadRequest, UnknownReference

Tensors = dict[str, torch.Tensor]
MIN_ENTRY_BYTES = 4096
SWEEP_EVERY_S = 1.0


@dataclass(frozen=True)
class HeldSpec:
    """A request's `_held` params, checked."""

    keep: dict[str, str] = field(default_factory=dict)  # tensor name -> id to keep it under
    use: dict[str, str] = field(default_factory=dict)  # tensor name -> id of the kept tensor it is

    @classmethod
    def parse(cls, raw: Any) -> HeldSpec:
        form = f'params.{HELD_PARAM} must be {{"{HELD_KEEP}": {{name: id}}, "{HELD_USE}": {{name: id}}}}'
        if not isinstance(raw, dict) or set(raw) - {HELD_KEEP, HELD_USE}:
            raise BadRequest(form, details={"received": raw if isinstance(raw, dict) else str(raw)[:200]})
        parts = {}
        for part in (HELD_KEEP, HELD_USE):
            names = raw.get(part, {})
            if not isinstance(names, dict):
                raise BadRequest(form)
            for name, ident in names.items():
                if not (isinstance(ident, str) and 0 < len(ident) <= HELD_ID_CHARS):
                    raise BadRequest(
                        f"params.{HELD_PARAM}.{part}.{name}: an id is a string of 1 to {HELD_ID_CHARS} "
                        f"characters, got {str(ident)[:80]!r}"
                    )
            parts[part] = dict(names)
        if len(set(parts[HELD_KEEP].values())) < len(parts[HELD_KEEP]):
            raise BadRequest(f"params.{HELD_PARAM}.{HELD_KEEP}: each tensor needs an id of its own")
        if both := sorted(set(parts[HELD_KEEP]) & set(parts[HELD_USE])):
            raise BadRequest(f"params.{HELD_PARAM}: tensors {both} are both kept and used")
        return cls(parts[HELD_KEEP], parts[HELD_USE])

    def check_sent(self, sent: Mapping[str, torch.Tensor]) -> None:
        """Kept tensors must travel with the request, used ones must not."""
        if missing := sorted(set(self.keep) - set(sent)):
            raise BadRequest(f"params.{HELD_PARAM}.{HELD_KEEP} names tensors {missing} the request lacks")
        if clash := sorted(set(self.use) & set(sent)):
            raise BadRequest(
                f"tensors {clash} were sent and also referred to in params.{HELD_PARAM}.{HELD_USE}"
            )


@dataclass
class _Entry:
    tensor: torch.Tensor
    cost: int  # bytes counted against the budgets


@dataclass
class HeldStats:
    hits: int = 0  # references resolved
    misses: int = 0  # references the service did not hold (409)
    kept: int = 0  # tensors kept
    refused: int = 0  # keeps that did not fit the budgets
    evicted: int = 0  # entries dropped for the budgets or an idle client


class HeldTensors:
    """Every client's kept tensors on `device`, in one least-recently-used order."""

    def __init__(
        self,
        device: torch.device,
        per_client_bytes: int,
        total_bytes: int,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.device = device
        self.per_client_bytes = per_client_bytes
        self.total_bytes = total_bytes
        self.idle_s = idle_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # (client, id), oldest first
        self._client_bytes: dict[str, int] = {}
        self._seen: dict[str, float] = {}  # client -> its last request carrying _held
        self._bytes = 0
        self._swept = clock()
        self.stats = HeldStats()

    @classmethod
    def of(cls, device: torch.device, core: CoreSettings) -> HeldTensors:
        mib = 1 << 20
        return cls(device, int(core.held_mb_per_client * mib), int(core.held_mb * mib), core.held_idle_s)

    # -- requests -----------------------------------------------------------------------------------
    def resolve(self, client: str, spec: HeldSpec, sent: Mapping[str, torch.Tensor]) -> Tensors:
        """The request's tensors: those it sent, on the device, and those it refers to."""
        self.sweep()
        self._seen[client] = self._clock()
        spec.check_sent(sent)
        found, missing = {}, []
        for name, ident in spec.use.items():
            entry = self._entries.get((client, ident))
            if entry is None:
                missing.append(name)
                continue
            self._entries.move_to_end((client, ident))
            found[name] = entry.tensor
        if missing:
            self.stats.misses += len(missing)
            raise UnknownReference(
                f"this service holds no tensor for {missing} under the ids client {client!r} gave",
                hint="it restarted or dropped them (budget, idle): send the tensors again",
                details={"names": missing},
            )
        self.stats.hits += len(found)
        moved = {n: t.to(self.device) for n, t in sent.items() if t.device != self.device}
        if self.device.type == "cuda":
            # Made on this thread's stream and read by the compute thread's (the default stream), which
            # may still be at it when the reply has left (IPC replies leave once outputs are queued): the
            # allocator must not hand their memory out again before that work is done.
            compute = torch.cuda.default_stream(self.device)
            for t in (*moved.values(), *found.values()):
                t.record_stream(compute)
        return {**sent, **moved, **found}

    def keep(self, client: str, spec: HeldSpec, sent: Mapping[str, torch.Tensor]) -> list[str]:
        """Keep copies of the tensors `spec.keep` names; returns the names kept. The copies are queued on
        this thread's stream: the caller awaits `gpu.device.stream_drained` before the reply lets the
        client reuse its IPC buffers."""
        kept: list[tuple[str, str]] = []
        for name, ident in spec.keep.items():
            t = sent[name]
            cost = max(t.numel() * t.element_size(), MIN_ENTRY_BYTES)
            self._drop((client, ident))  # an id kept again replaces its tensor
            if not self._make_room(client, cost, protected=set(kept)):
                self.stats.refused += 1
                continue
            self._entries[(client, ident)] = _Entry(t.detach().to(self.device, copy=True), cost)
            self._client_bytes[client] = self._client_bytes.get(client, 0) + cost
            self._bytes += cost
            self.stats.kept += 1
            kept.append((client, ident))
        names = {ident: name for name, ident in spec.keep.items()}
        return [names[ident] for _, ident in kept]

    # -- budgets ------------------------------------------------------------------------------------
    def _make_room(self, client: str, cost: int, protected: set[tuple[str, str]]) -> bool:
        """Evict least recently used entries (not `protected`) until `cost` fits both budgets."""
        if cost > self.per_client_bytes or cost > self.total_bytes:
            return False
        own = [k for k in self._entries if k[0] == client and k not in protected]
        while self._client_bytes.get(client, 0) + cost > self.per_client_bytes:
            if not own:
                return False
            self._drop(own.pop(0), evicted=True)
        others = [k for k in self._entries if k not in protected]
        while self._bytes + cost > self.total_bytes:
            if not others:
                return False
            self._drop(others.pop(0), evicted=True)
        return True

    def _drop(self, key: tuple[str, str], evicted: bool = False) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        client = key[0]
        self._client_bytes[client] -= entry.cost
        if not self._client_bytes[client]:
            del self._client_bytes[client]
        self._bytes -= entry.cost
        self.stats.evicted += evicted

    def sweep(self) -> None:
        """Drop the entries of clients idle longer than idle_s (checked at most every SWEEP_EVERY_S)."""
        now = self._clock()
        if now - self._swept < SWEEP_EVERY_S:
            return
        self._swept = now
        idle = {c for c, seen in self._seen.items() if now - seen > self.idle_s}
        for key in [k for k in self._entries if k[0] in idle]:
            self._drop(key, evicted=True)
        for client in idle:
            del self._seen[client]

    def describe(self) -> dict[str, Any]:
        self.sweep()
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "clients": len(self._client_bytes),
            "budget_bytes": self.total_bytes,
            "per_client_bytes": self.per_client_bytes,
            **vars(self.stats),
        }
