"""Per-request LoRA computed beside the shared weights: y = W·x + Σ sᵢ·(alphaᵢ/rankᵢ)·Bᵢ(Aᵢ·x).

`attach_side_paths(model)` puts a forward hook on every adaptable module (nn.Linear, plain nn.Conv2d).
A hook rather than a replacement module keeps the model's module tree, state_dict keys and parameter
objects unchanged, and works on subclasses with their own forward (GGUF, layerwise-cast fp8 layers).

The runner says which rows use which adapters with a plan around the forward:

    with slots.plan([(0, 2, [(lora_a, 0.8)]), (4, 6, [(lora_a, 0.8), (lora_b, -0.5)])]):
        model(x, ...)

Rows are the leading batch dimension of every adapted module's input ([B, tokens, C] for attention and
MLP layers, [B, C, H, W] for convs, [B, C] for embeddings). Rows outside every group (here 2..3) get
exactly base(x), bitwise: the hook only adds into the rows of its groups.

No host sync happens in a forward: the plan is compiled on entry into per-module lists of row ranges and
(factors, scale) terms; factors already live on the model's device and dtype.

Captured CUDA graphs (graphs.py) use the same hooks with a static `BankedPath` instead of a plan
(`use_bank`): adapters in fixed slots, chosen per row by a scale tensor, so one capture serves every
stack. A batch whose adapters do not fit the bank runs eager under a plan, as here.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from luna_stack.lora.resolve import ResolvedLora, adaptable_modules
from luna_stack.wire.errors import BadRequest


class BankedPath(Protocol):
    """A static adapter bank (bank.py's BankedPath) as the hooks use it inside captured graphs."""

    down: dict[str, torch.Tensor]  # module name -> stacked down factors of its slots

    def apply(
        self, name: str, x: torch.Tensor, output: torch.Tensor, scale: torch.Tensor, window: tuple[int, int]
    ) -> None: ...


Stack = Sequence[tuple[ResolvedLora, float]]  # adapters and their strengths, applied together
RowGroup = tuple[int, int, Stack]  # rows [start, end) of the batch and their stack


@dataclass(frozen=True)
class _Term:
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # strength · alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# module name -> [(row start, row end, terms)]
_CompiledPlan = dict[str, list[tuple[int, int, tuple[_Term, ...]]]]


def row_groups(requests: Sequence[tuple[int, Stack]]) -> list[RowGroup]:
    """Plan for a batch laid out request after request: (row count, stack) each.

    Adjacent requests with the same stack (same adapter objects, same strengths) share one group, so
    their rows go through each adapter matmul together; requests without LoRA get no group.
    """
    groups: list[RowGroup] = []
    row = 0
    for rows, stack in requests:
        stack = tuple(stack)
        if stack and groups and groups[-1][1] == row and tuple(groups[-1][2]) == stack:
            groups[-1] = (groups[-1][0], row + rows, stack)
        elif stack and rows:
            groups.append((row, row + rows, stack))
        row += rows
    return groups


class LoraSlots:
    """The side paths of one model; `plan()` activates adapters for the forward inside it."""

    def __init__(self, model: nn.Module):
        self._model_ref = weakref.ref(model)
        self.modules = adaptable_modules(model)
        self._active: ContextVar[_CompiledPlan | None] = ContextVar(f"lora_plan_{id(self)}", default=None)
        self._bank: ContextVar[tuple[BankedPath, torch.Tensor, tuple[int, int]] | None] = ContextVar(
            f"lora_bank_{id(self)}", default=None
        )
        self._handles = [
            module.register_forward_hook(partial(self._side, name), with_kwargs=True)
            for name, module in self.modules.items()
        ]

    @contextmanager
    def plan(self, groups: Sequence[RowGroup]) -> Iterator[None]:
        token = self._active.set(self._compile(groups))
        try:
            yield
        finally:
            self._active.reset(token)

    @contextmanager
    def use_bank(self, bank: BankedPath, scale: torch.Tensor, window: tuple[int, int]) -> Iterator[None]:
        """Forwards inside add `bank`'s side path over its slots `window`, rows weighted by `scale`."""
        token = self._bank.set((bank, scale, window))
        try:
            yield
        finally:
            self._bank.reset(token)

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref()

    def detach(self) -> None:
        """Remove the hooks; the model is then exactly what it was before attach_side_paths."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model_ref()
        if model is not None and _SLOTS.get(model) is self:
            del _SLOTS[model]

    def _compile(self, groups: Sequence[RowGroup]) -> _CompiledPlan:
        model = self._model_ref()
        compiled: _CompiledPlan = {}
        end_of_previous = 0
        for start, end, stack in sorted(groups, key=lambda g: g[0]):
            if not 0 <= start < end or start < end_of_previous:
                raise ValueError(f"LoRA plan rows must be disjoint, non-empty ranges: {list(groups)}")
            end_of_previous = end
            terms: dict[str, list[_Term]] = {}
            for lora, strength in stack:
                if not math.isfinite(strength):
                    raise BadRequest(f"LoRA {lora.name}: strength must be a finite number, got {strength}")
                if not lora.belongs_to(model):
                    raise ValueError(f"LoRA {lora.name} was resolved against another model than this one")
                if strength == 0:
                    continue
                for name, f in lora.factors.items():
                    terms.setdefault(name, []).append(_Term(f.down, f.up, strength * f.scale))
            for name, module_terms in terms.items():
                compiled.setdefault(name, []).append((start, end, tuple(module_terms)))
        return compiled

    def _side(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: torch.Tensor,
    ) -> torch.Tensor | None:
        banked = self._bank.get()
        plan = self._active.get()
        work = plan.get(name) if plan else None
        if not work and (banked is None or name not in banked[0].down):
            return None
        x = args[0] if args else kwargs["input"]
        if banked is not None and name in banked[0].down:
            banked[0].apply(name, x, output, banked[1], banked[2])
        if not work:
            return output
        for start, end, terms in work:
            if end > x.shape[0]:
                raise ValueError(f"LoRA plan reaches row {end} but {name} sees a batch of {x.shape[0]}")
            rows, out = x[start:end], output[start:end]
            for t in terms:
                if t.down.dim() == 4:
                    hidden = F.conv2d(rows, t.down, None, module.stride, module.padding, module.dilation)
                    out.add_(F.conv2d(hidden, t.up), alpha=t.scale)
                elif out.is_contiguous():  # the up GEMM accumulates into the output: one pass less
                    hidden = F.linear(rows, t.down)
                    out.view(-1, out.shape[-1]).addmm_(hidden.view(-1, t.rank), t.up.t(), alpha=t.scale)
                else:
                    out.add_(F.linear(F.linear(rows, t.down), t.up), alpha=t.scale)
        return output


_SLOTS: weakref.WeakKeyDictionary[nn.Module, LoraSlots] = weakref.WeakKeyDictionary()


def attach_side_paths(model: nn.Module) -> LoraSlots:
    """Hook every adaptable module of `model` (once; a second call returns the same slots)."""
    if model not in _SLOTS:
        _SLOTS[model] = LoraSlots(model)
    return _SLOTS[model]
