"""Luna Stack for ComfyUI: standard nodes on shared CLIP / VAE / UNet services, plus Luna-compatible nodes.

Relative imports only, so the pack never collides with other packs' module names. Inside ComfyUI the
LoraLoader hook and the zero-edit routing of ComfyUI's loaders (off unless enabled) are installed;
outside it (tests, tools) the pack imports without ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

try:
    import comfy.sd  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from . import comfy_hooks, zero_edit

    comfy_hooks.install()
    zero_edit.install()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
