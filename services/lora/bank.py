"""Per-request LoRA inside a captured CUDA graph: adapter factors in static buffers, chosen per row by a
scale table, so switching stacks never re-captures.

Per adaptable module the bank holds K slots of rank r_max side by side (zero-padded ranks):

    down [K·r_max, in]     up [out, K·r_max]  (alpha/rank folded into up)
    side(x) = ((x @ downᵀ) * scale[row]) @ upᵀ      added to the module's output

`scale` is one static [rows, K·r_max] input of the graph, shared by every module: for each row, the
strength of the adapter in slot k over columns k·r_max..(k+1)·r_max, 0 elsewhere (and in padded rows).
Two GEMMs per module whatever the stack. Graphs are captured per slot window: a batch whose adapters
all sit in one slot (one LoRA, the common case) replays a graph reading only that slot's r_max columns,
a batch using several slots the full K·r_max. Slots are filled outside capture (copies into the static
buffers) by an LRU over adapters. A batch needing more than K distinct adapters, an adapter of higher
rank than r_max, or one adapting a module the bank does not hold (kxk convs: LoCon) does not fit: that
batch runs eager through the hooks of lora_side.py, which stay exact.

Banked modules: every nn.Linear (quantized subclasses included) and plain 1x1 convs. kxk convs are left
out on purpose: a K·r_max-wide kxk conv at full latent resolution would cost about as much as the conv
it adapts, in every LoRA forward, for the few files that adapt them.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from luna_stack.lora.resolve import ResolvedLora
from luna_stack.lora.side import LoraSlots, Stack
from luna_stack.wire.errors import BadRequest

log = logging.getLogger(__name__)

Window = tuple[int, int]  # slots [lo, hi) a graph's side path reads


def bankable(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return (
            module.kernel_size == (1, 1)
            and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid")
            and module.groups == 1
        )
    return isinstance(module, nn.Linear)


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    assert isinstance(module, nn.Linear)
    return module.in_features, module.out_features


class LoraBank:
    """K adapter slots of one model's side paths (`slots`), in static buffers of the compute dtype."""

    def __init__(self, slots: LoraSlots, count: int, rank: int, dtype: torch.dtype, device: torch.device):
        if count < 1 or rank < 1:
            raise ValueError(f"a LoRA bank needs at least one slot of rank >= 1, got {count} x {rank}")
        self.slots = slots
        self.count = count
        self.rank = rank
        self.dtype = dtype
        self.device = torch.device(device)
        # The banked modules' (in, out) features; their factor buffers are allocated when the first LoRA
        # batch needs them (`allocate`): a service that never sees a LoRA never holds the bank.
        self.features = {name: _features(m) for name, m in slots.modules.items() if bankable(m)}
        self.convs = {
            name for name, m in slots.modules.items() if name in self.features and isinstance(m, nn.Conv2d)
        }
        self.down: dict[str, torch.Tensor] = {}
        self.up: dict[str, torch.Tensor] = {}
        self._owner: list[weakref.ref[ResolvedLora] | None] = [None] * count
        self._written: list[dict[str, int]] = [{} for _ in range(count)]  # slot -> module -> rank written
        self._last_use = [0] * count
        self._clock = 0
        self._misfit: weakref.WeakKeyDictionary[ResolvedLora, str | None] = weakref.WeakKeyDictionary()
        self.fills = 0
        self.hits = 0
        self.misses = 0  # batches that did not fit (ran eager)

    @property
    def width(self) -> int:
        return self.count * self.rank

    @property
    def windows(self) -> list[Window]:
        """The slot windows graphs are captured for: each slot alone, then all of them."""
        return list(dict.fromkeys([*((s, s + 1) for s in range(self.count)), (0, self.count)]))

    @property
    def nbytes(self) -> int:
        """Device bytes the factor buffers hold now (0 until the first LoRA batch)."""
        return sum(t.numel() * t.element_size() for d in (self.down, self.up) for t in d.values())

    @property
    def allocated(self) -> bool:
        return bool(self.down) or not self.features

    def allocate(self) -> bool:
        """The zeroed factor buffers of every banked module (once), all or none: False when the device has
        no room for them now (the batch then runs without the bank; a later LoRA batch tries again)."""
        if self.allocated:
            return True
        down: dict[str, torch.Tensor] = {}
        up: dict[str, torch.Tensor] = {}
        try:
            for name, (fan_in, fan_out) in self.features.items():
                down[name] = torch.zeros(self.width, fan_in, dtype=self.dtype, device=self.device)
                up[name] = torch.zeros(fan_out, self.width, dtype=self.dtype, device=self.device)
        except torch.OutOfMemoryError:
            log.warning(
                "LoRA bank: no device memory for the factor buffers of %d modules; LoRA batches run eager",
                len(self.features),
            )
            return False
        # Whole dicts swapped in (`down` last: `allocated` reads it): /v1/status may read them meanwhile.
        self.up = up
        self.down = down
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "slots": self.count,
            "max_rank": self.rank,
            "modules": len(self.features),
            "allocated": self.allocated,
            "bytes": self.nbytes,
            "resident": [o().name if o is not None and o() is not None else None for o in self._owner],
            "fills": self.fills,
            "hits": self.hits,
            "misses": self.misses,
        }

    # -- slots ----------------------------------------------------------------------------------------
    def misfit(self, lora: ResolvedLora) -> str | None:
        """Why `lora` cannot live in this bank, or None when it can."""
        if lora not in self._misfit:
            reason = None
            for name, f in lora.factors.items():
                if name not in self.features:
                    reason = f"module {name} has no bank slot (only Linear and 1x1 convs are banked)"
                elif f.rank > self.rank:
                    reason = f"rank {f.rank} at {name} exceeds the bank's max rank {self.rank}"
                if reason:
                    break
            self._misfit[lora] = reason
        return self._misfit[lora]

    def _slot_of(self, lora: ResolvedLora) -> int | None:
        for slot, owner in enumerate(self._owner):
            if owner is not None and owner() is lora:
                return slot
        return None

    def assign(self, adapters: Sequence[ResolvedLora]) -> dict[ResolvedLora, int] | None:
        """A slot per distinct adapter, filling slots (least recently used first) for those not resident;
        None, and nothing evicted, when they do not fit."""
        wanted = [a for a in dict.fromkeys(adapters) if a.factors]
        if len(wanted) > self.count or any(self.misfit(a) for a in wanted):
            return None
        model = self.slots.model
        for a in wanted:
            if model is not None and not a.belongs_to(model):
                raise ValueError(f"LoRA {a.name} was resolved against another model than this bank's")
        if not self.allocate():
            return None
        slot_of = {a: s for a in wanted if (s := self._slot_of(a)) is not None}
        self.hits += len(slot_of)
        taken = set(slot_of.values())
        # Free or dead slots first, then the least recently used.
        spare = sorted(
            (s for s in range(self.count) if s not in taken),
            key=lambda s: (self._owner[s] is not None and self._owner[s]() is not None, self._last_use[s]),
        )
        for a in wanted:
            if a not in slot_of:
                slot_of[a] = spare.pop(0)
                self._fill(slot_of[a], a)
        self._clock += 1
        for s in slot_of.values():
            self._last_use[s] = self._clock
        return slot_of

    @torch.inference_mode()
    def _fill(self, slot: int, lora: ResolvedLora) -> None:
        lo = slot * self.rank
        ranks = {name: f.rank for name, f in lora.factors.items()}
        # Zero only what the previous owner wrote and the new one does not overwrite.
        for name, old in self._written[slot].items():
            keep = ranks.get(name, 0)
            if old > keep:
                self.down[name][lo + keep : lo + old].zero_()
                self.up[name][:, lo + keep : lo + old].zero_()
        for name, f in lora.factors.items():
            r = f.rank
            self.down[name][lo : lo + r].copy_(f.down.reshape(r, -1))
            self.up[name][:, lo : lo + r].copy_(f.up.reshape(f.up.shape[0], r).float() * f.scale)
        self._written[slot] = ranks
        self._owner[slot] = weakref.ref(lora)
        self.fills += 1

    def scale_table(
        self, stacks: Sequence[tuple[int, Stack]], rows: int
    ) -> tuple[torch.Tensor, Window] | None:
        """The scale input for requests laid out one after another ((rows, stack) each), zero beyond them
        (padded rows), and the slot window it covers: [rows, r_max] for one slot, [rows, K·r_max] for
        several. None when their adapters do not fit the bank."""
        for _, stack in stacks:
            for lora, strength in stack:
                if not math.isfinite(strength):
                    raise BadRequest(f"LoRA {lora.name}: strength must be a finite number, got {strength}")
        slot_of = self.assign([lora for _, stack in stacks for lora, strength in stack if strength != 0])
        if slot_of is None:
            self.misses += 1
            return None
        table = torch.zeros(rows, self.width, dtype=torch.float32)
        row = 0
        for n, stack in stacks:
            for lora, strength in stack:
                if lora in slot_of:
                    lo = slot_of[lora] * self.rank
                    table[row : row + n, lo : lo + self.rank] += strength
            row += n
        if row > rows:
            raise ValueError(f"{row} rows of requests for a scale table of {rows}")
        used = set(slot_of.values())
        window = (min(used), min(used) + 1) if len(used) == 1 else (0, self.count)
        return table[:, window[0] * self.rank : window[1] * self.rank].to(self.dtype), window

    # -- forward --------------------------------------------------------------------------------------
    @contextmanager
    def active(self, scale: torch.Tensor, window: Window) -> Iterator[None]:
        """Forwards inside add the bank's side path over slots `window`, rows weighted by `scale`
        [rows, slots in window · r_max] (what gets captured)."""
        if not self.allocate():
            raise torch.OutOfMemoryError("LoRA bank: no device memory for its factor buffers")
        with self.slots.use_bank(self, scale, window):
            yield

    def apply(
        self, name: str, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, window: Window
    ) -> None:
        """out += ((x @ downᵀ) * scale[row]) @ upᵀ over the window's slots, for module `name` (called from
        lora_side's hook)."""
        if x.shape[0] != scale.shape[0]:
            raise ValueError(f"LoRA bank: {name} sees {x.shape[0]} rows, the scale table {scale.shape[0]}")
        lo, hi = window[0] * self.rank, window[1] * self.rank
        down, up = self.down[name][lo:hi], self.up[name][:, lo:hi]
        if name in self.convs:
            hidden = F.conv2d(x, down[:, :, None, None])
            hidden.mul_(scale[:, :, None, None])
            out.add_(F.conv2d(hidden, up[:, :, None, None]))
            return
        hidden = F.linear(x, down)
        hidden.mul_(scale.view(scale.shape[0], *([1] * (hidden.dim() - 2)), hi - lo))
        if out.is_contiguous():  # the up GEMM accumulates into the output: one pass less
            out.view(-1, out.shape[-1]).addmm_(hidden.view(-1, hi - lo), up.t())
        else:
            out.add_(F.linear(hidden, up))
