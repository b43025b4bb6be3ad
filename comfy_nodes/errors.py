"""Service errors turned into one sentence a ComfyUI user can act on: which service, where it was looked
for, what to do. The exception types are the package's (luna_stack.client.errors), so ComfyUI's error
dialog names them readably."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from luna_stack.client.errors import (
    LunaStackError,
    LunaStackModelMissing,
    LunaStackPatchError,
    LunaStackUnavailable,
)
from luna_stack.wire.errors import LunaError, PathNotAllowed, Unavailable, UnknownModel

# The names before issue 16, kept for code that catches them.
LunaNodeError = LunaStackError
RemotePatchError = LunaStackPatchError

__all__ = [
    "LunaNodeError",
    "LunaStackError",
    "LunaStackModelMissing",
    "LunaStackPatchError",
    "LunaStackUnavailable",
    "RemotePatchError",
    "check_remote_safe",
    "missing_model",
    "unavailable",
    "user_error",
]


def _service(kind: str) -> str:
    return f"Luna Stack {kind.upper()} service"


def unavailable(kind: str, where: str, reason: str) -> LunaStackUnavailable:
    return LunaStackUnavailable(
        f"The {_service(kind)} is not reachable at {where} ({reason}): start the stack "
        f"(`luna-stack run`, or `make up` with Docker) or point LUNA_{kind.upper()}_URL at it."
    )


def missing_model(kind: str, where: str, label: str, available: Sequence[str]) -> LunaStackModelMissing:
    """`label`: the model as ComfyUI names it with its folder (`checkpoints/sd15.safetensors`)."""
    folder = label.split("/", 1)[0]
    shown = ", ".join(available[:8]) + (f" (+{len(available) - 8} more)" if len(available) > 8 else "")
    choice = f"pick one it serves: {shown}" if available else f"it serves no {folder} models yet"
    return LunaStackModelMissing(
        f"The {_service(kind)} at {where} does not serve {label}: put the file into {folder}/ under the "
        f"stack's model roots (share the models folder with ComfyUI), or {choice}."
    )


def user_error(exc: LunaError, kind: str, where: str) -> LunaStackError:
    """A service's typed error as one readable sentence."""
    if isinstance(exc, Unavailable):
        return unavailable(kind, where, str(exc.details.get("reason") or exc.message))
    if isinstance(exc, UnknownModel):
        hint = f" ({exc.hint})" if exc.hint else ""
        return LunaStackModelMissing(
            f"The {_service(kind)} at {where} does not have that model: {exc.message}{hint}; put the file "
            "under the stack's model roots, or pick one from the loader's list."
        )
    if isinstance(exc, PathNotAllowed):
        return LunaStackError(f"The {_service(kind)} at {where} refused a model path: {exc}.")
    return LunaStackError(f"The {_service(kind)} at {where} failed ({exc.code}): {exc}.")


def check_remote_safe(transformer_options: dict[str, Any]) -> None:
    """Python callables patched into the UNet's blocks cannot run in the service: refuse, loudly."""
    patches = {k: v for k, v in (transformer_options.get("patches") or {}).items() if v}
    replace = {k: v for k, v in (transformer_options.get("patches_replace") or {}).items() if v}
    if patches or replace:
        names = sorted(patches) + sorted(replace)
        raise LunaStackPatchError(
            f"this MODEL carries UNet patches ({', '.join(names)}) from a node that patches attention or "
            "blocks locally; they cannot run on the shared Luna Stack UNet. Remove that node, or load the "
            "model with ComfyUI's own loader for this workflow."
        )
