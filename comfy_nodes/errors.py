"""Service errors turned into messages a ComfyUI user can act on."""

from __future__ import annotations

from typing import Any

from luna_stack.wire.errors import LunaError, PathNotAllowed, Unavailable, UnknownModel


class LunaNodeError(RuntimeError):
    """What a node raises: ComfyUI shows the message in its error dialog."""


class RemotePatchError(LunaNodeError):
    """A model patch (a Python callable) that cannot run inside the shared UNet service."""


def user_error(exc: LunaError, kind: str, where: str) -> LunaNodeError:
    """One readable line per failure: what failed, why, and what to do."""
    service = f"Luna Stack {kind.upper()} service"
    if isinstance(exc, Unavailable):
        text = f"{service} is not reachable via {where}: {exc.message}"
        hint = exc.hint or "start it (luna-stack serve " + kind + ") or fix the URL"
    elif isinstance(exc, UnknownModel):
        text = f"{service} does not have that model: {exc.message}"
        hint = exc.hint or "put the file under the stack's model roots, or pick one from the loader's list"
    elif isinstance(exc, PathNotAllowed):
        text = f"{service} refused a model path: {exc.message}"
        hint = exc.hint
    else:
        text = f"{service} failed ({exc.code}): {exc.message}"
        hint = exc.hint
    return LunaNodeError(f"{text}. {hint}" if hint else text)


def check_remote_safe(transformer_options: dict[str, Any]) -> None:
    """Python callables patched into the UNet's blocks cannot run in the service: refuse, loudly."""
    patches = {k: v for k, v in (transformer_options.get("patches") or {}).items() if v}
    replace = {k: v for k, v in (transformer_options.get("patches_replace") or {}).items() if v}
    if patches or replace:
        names = sorted(patches) + sorted(replace)
        raise RemotePatchError(
            f"this MODEL carries UNet patches ({', '.join(names)}) from a node that patches attention or "
            "blocks locally; they cannot run on the shared Luna Stack UNet. Remove that node, or load the "
            "model with ComfyUI's own loader for this workflow."
        )
