"""The LoRA stack a proxy carries: LoraLoader's patches cannot reach remote weights, so the proxies keep
(file name, strength) pairs and send them with every request; the service applies them beside the
shared weights.

A MODEL proxy keeps its stack in ModelPatcher.model_options["transformer_options"]: model_options are
copied on clone() and reach the diffusion model with every call, so each clone sends its own stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoraStack:
    entries: tuple[tuple[str, float], ...] = ()

    def add(self, name: str, strength: float) -> LoraStack:
        """A new stack with the LoRA appended; strength 0 is a no-op, as in ComfyUI."""
        if strength == 0:
            return self
        return LoraStack((*self.entries, (name, float(strength))))

    def to_wire(self) -> list[dict[str, Any]]:
        return [{"name": name, "strength": strength} for name, strength in self.entries]

    def __bool__(self) -> bool:
        return bool(self.entries)

    @classmethod
    def from_wire(cls, entries: Iterable[dict[str, Any]]) -> LoraStack:
        return cls(tuple((e["name"], float(e["strength"])) for e in entries))


LORA_OPTION = "luna_stack_lora"


def stack_in(transformer_options: dict[str, Any]) -> LoraStack:
    return LoraStack.from_wire(transformer_options.get(LORA_OPTION, []))


def add_to_options(transformer_options: dict[str, Any], name: str, strength: float) -> None:
    """Append a LoRA to the stack kept in (a clone's own copy of) transformer_options."""
    transformer_options[LORA_OPTION] = stack_in(transformer_options).add(name, strength).to_wire()


def lora_name(path: str, lora_dirs: Iterable[str]) -> str:
    """A LoRA file's name as the services know it: relative to a loras folder, '/'-separated."""
    real = os.path.realpath(path)
    for folder in lora_dirs:
        base = os.path.realpath(folder)
        if os.path.commonpath([real, base]) == base:
            return os.path.relpath(real, base).replace(os.sep, "/")
    return os.path.basename(path)
