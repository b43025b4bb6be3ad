"""ComfyUI's progress bar, when running inside ComfyUI (imported lazily; absent in plain Python)."""

from __future__ import annotations

from collections.abc import Callable


def comfy_progress() -> Callable[[int, int], None] | None:
    """A callback moving comfy.utils.ProgressBar to (done, total), or None outside ComfyUI."""
    try:
        import comfy.utils
    except ImportError:
        return None
    bars: dict[int, comfy.utils.ProgressBar] = {}

    def update(done: int, total: int) -> None:
        bar = bars.get(total) or bars.setdefault(total, comfy.utils.ProgressBar(total))
        bar.update_absolute(done, total)

    return update
