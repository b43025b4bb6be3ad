"""The errors a user of the stack sees from its clients (the ComfyUI pack's nodes raise these): one
sentence naming the service, where it was looked for and what to do.

They live in the package, not in the pack, so their type names read `luna_stack.client.errors.X` in
ComfyUI's error dialog (ComfyUI imports a pack under its file path, which would make a type defined in
the pack read like `/opt/ComfyUI/custom_nodes/luna-stack.comfy_nodes.errors.X`).
"""

from __future__ import annotations


class LunaStackError(RuntimeError):
    """Something the stack could not do for this request; the message says what to do about it."""


class LunaStackUnavailable(LunaStackError):
    """A service is not reachable (not started, wrong URL, or no replica in the registry)."""


class LunaStackModelMissing(LunaStackError):
    """A service does not serve the model or LoRA a node names."""


class LunaStackPatchError(LunaStackError):
    """A model patch (a Python callable) that cannot run inside the shared UNet service."""
