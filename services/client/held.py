"""Held tensors, client side: a tensor sent once is referred to by id while it stays the same.

`AsyncClient.call(..., keep=("context", "y"))` names the sticky inputs. Per name this remembers the last
DEPTH tensors the service confirmed it kept (our own copies) with their ids; a new tensor equal to one of
them (same dtype, shape, device and bits — `torch.equal` on the bits: exact, no hashing, -0.0 is not
0.0) travels as a reference instead of bytes, and through CUDA IPC it is not written into the exchange
buffer either. A tensor not remembered is sent and kept under a fresh id. When the service answers
`unknown_reference` (it restarted, or dropped the entry), everything remembered is forgotten and the
call is sent once more in full. The protocol: server/held.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from luna_stack.wire.contract import HELD_KEEP, HELD_KEPT, HELD_USE

# Tensors remembered per name: ComfyUI may alternate cond batches (cond and uncond of different token
# lengths run as two calls per step).
DEPTH = 4


@dataclass
class _Sent:
    tensor: torch.Tensor  # a copy of what was sent: the caller may reuse its tensor's memory
    id: str


@dataclass
class HeldPlan:
    """One call: what travels, its `_held` params, and what the service is asked to keep."""

    tensors: dict[str, torch.Tensor]
    keep: dict[str, _Sent] = field(default_factory=dict)
    use: dict[str, str] = field(default_factory=dict)  # name -> id

    def param(self) -> dict[str, dict[str, str]]:
        return {HELD_KEEP: {n: s.id for n, s in self.keep.items()}, HELD_USE: dict(self.use)}


@dataclass
class HeldCounts:
    referred: int = 0  # tensors that travelled as a reference
    sent: int = 0  # sticky tensors that travelled in full
    resent: int = 0  # calls sent again in full after unknown_reference


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal on the bits (same dtype and shape assumed): -0.0 is not 0.0, a NaN equals itself."""
    bits = _BITS.get(a.element_size())
    if bits is None or a.is_complex():
        return torch.equal(a, b)
    return torch.equal(a.view(bits), b.view(bits))


class HeldInputs:
    """The sticky tensors one client sent, per name, most recent first."""

    def __init__(self, depth: int = DEPTH):
        self.depth = depth
        self._sent: dict[str, list[_Sent]] = {}
        self.counts = HeldCounts()

    def plan(self, tensors: Mapping[str, torch.Tensor], keep: Sequence[str]) -> HeldPlan:
        plan = HeldPlan(dict(tensors))
        for name in keep:
            t = plan.tensors.get(name)
            if t is None:
                continue
            match = self._find(name, t)
            if match is not None:
                plan.use[name] = match.id
                del plan.tensors[name]
                self.counts.referred += 1
            else:
                plan.keep[name] = _Sent(t.detach().clone(), secrets.token_hex(8))
                self.counts.sent += 1
        return plan

    def _find(self, name: str, t: torch.Tensor) -> _Sent | None:
        entries = self._sent.get(name, [])
        for i, sent in enumerate(entries):
            s = sent.tensor
            if s.dtype == t.dtype and s.shape == t.shape and s.device == t.device and same_bits(s, t):
                entries.insert(0, entries.pop(i))
                return sent
        return None

    def confirm(self, plan: HeldPlan, reply: Any) -> None:
        """Remember what the reply's `_held` says the service kept."""
        kept = reply.get(HELD_KEPT, []) if isinstance(reply, dict) else []
        for name in kept:
            if name in plan.keep:
                entries = self._sent.setdefault(name, [])
                entries.insert(0, plan.keep[name])
                del entries[self.depth :]

    def forget(self) -> None:
        self._sent.clear()
