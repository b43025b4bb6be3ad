"""Luna Stack as a ComfyUI custom-node pack: clone this repository into ComfyUI/custom_nodes/ and
`pip install -r requirements.txt` (the client only: no diffusers, no transformers).

ComfyUI imports this file as the pack. The package the nodes use, `luna_stack`, is this checkout's
`services/` folder: a finder for it is installed when ComfyUI first asks for the node mappings (so the
pack's nodes always run against the client of the same checkout, whatever else is installed). Nothing
happens at import time, so test runners and tools that import this file as a package are unaffected.
The pip route (`pip install .` and `comfy_nodes/` linked into custom_nodes/) does not use this file.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(ROOT, "services")
WEB_DIRECTORY = "web"  # the pack's frontend extension: its settings (zero-edit mode)
_EXPORTS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports `luna_stack` and its submodules from this checkout's services/ folder."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "luna_stack" and not fullname.startswith("luna_stack."):
            return None
        base = os.path.join(PACKAGE_DIR, *fullname.split(".")[1:])
        init = os.path.join(base, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[base])
        if os.path.isfile(base + ".py"):
            return importlib.util.spec_from_file_location(fullname, base + ".py")
        return None


def use_checkout_package() -> None:
    """Make `luna_stack` this checkout's (unless a luna_stack is imported already in this process)."""
    if "luna_stack" in sys.modules or any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        return
    installed = importlib.util.find_spec("luna_stack")  # finds without importing
    if installed is not None and installed.origin and os.path.dirname(installed.origin) != PACKAGE_DIR:
        logging.getLogger("luna_stack.comfy").info(
            "Luna Stack: using the package in %s, not the one installed at %s", PACKAGE_DIR, installed.origin
        )
    sys.meta_path.insert(0, CheckoutFinder())


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    use_checkout_package()
    from . import comfy_nodes

    return getattr(comfy_nodes, name)


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
