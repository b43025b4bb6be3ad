"""Stand-in for a PyAV submodule while ComfyUI imports (see av/__init__.py)."""

from av import __getattr__ as __getattr__
