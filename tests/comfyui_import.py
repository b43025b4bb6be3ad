"""ComfyUI imported headless on the CPU, with torchvision's gaps covered. Imports nothing of luna_stack,
so a process can import ComfyUI with it before a pack brings its own luna_stack (the install test)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch

# torchvision's PyPI wheel registers fake kernels for C++ ops that a CPU-only torch build lacks.
_TORCHVISION_OPS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
]
_keep_alive: list[Any] = []


class _NoTorchvision(types.ModuleType):
    """Stand-in for torchvision while ComfyUI imports: any use raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name}: torchvision is not installed (a stand-in for the test)")


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """ComfyUI imports torchvision at module level for models this test never builds (Stable Cascade's
    EfficientNet, Cosmos, ACE, WanMove); without torchvision installed, stand-in modules satisfy those
    imports while ComfyUI is imported and are removed afterwards. transformers and diffusers record that
    torchvision is absent before the stand-ins exist (both cache the answer)."""
    import diffusers.utils
    import transformers.utils

    assert not transformers.utils.is_torchvision_available()
    assert not diffusers.utils.is_torchvision_available()
    names = ["torchvision", "torchvision.models", "torchvision.transforms"]
    names.append("torchvision.transforms.functional")
    stand_ins = {name: _NoTorchvision(name) for name in names}
    for name, module in stand_ins.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_ins[parent], child, module)
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]


def _import_torchvision() -> bool:
    """True when torchvision is installed (and importable); False when it is not."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OPS:
            lib.define(schema)
        _keep_alive.append(lib)
        importlib.import_module("torchvision")
    return True


def import_comfyui(path: str, flags: Sequence[str] = ("--cpu",)) -> Any:
    """ComfyUI headless (on the CPU by default): its flags parsed before comfy.cli_args is imported."""
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        with nullcontext() if _import_torchvision() else _torchvision_stand_in():
            import comfy.options

            comfy.options.enable_args_parsing()
            argv, sys.argv = sys.argv, [sys.argv[0], *flags]
            try:
                import comfy.cli_args
            finally:
                sys.argv = argv
            import comfy.sd
            import comfy.supported_models
            import execution
            import folder_paths
            import nodes
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {path} does not import here ({exc}); use a Python with its requirements")
    return execution, folder_paths, nodes


class PromptServerStub:
    """What ComfyUI's PromptExecutor needs of its PromptServer when a prompt runs without the HTTP server."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        return None

    def queue_updated(self) -> None:
        return None
