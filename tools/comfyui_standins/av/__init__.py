"""Stand-in for PyAV while ComfyUI imports (image workflows never use it): any attribute use raises."""

from __future__ import annotations

from typing import Any


class _Unavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("PyAV is not installed (a stand-in for headless image benchmarks)")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable
