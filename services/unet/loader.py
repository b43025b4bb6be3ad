"""Load a diffusion model from the files ComfyUI users have, through the architecture that claims it.

Accepted: single-file checkpoints (the diffusion model under `model.diffusion_model.`, VAE / text-encoder
tensors ignored), standalone files (`unet/`, `diffusion_models/`), fp8 copies of either, and GGUF files in
city96's ComfyUI-GGUF convention (optional `model.diffusion_model.` prefix; tensors reshaped for
quantization carry `comfy.gguf.orig_shape.<key>`). Which architecture a file holds comes from its keys and
shapes (arch.py), so the same code loads a real file and a small random-weight fixture.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from luna_stack.weights.checkpoint import detect, error_reason, load_shapes, load_state_dict
from luna_stack.weights.gguf_file import is_gguf, read_gguf
from luna_stack.weights.precision import QuantizedWeight, compute_dtype, resident_bytes
from luna_stack.wire.errors import ModelLoadError

from .arch import Architecture, DiffusionModel, Loaded, StateDict
from .flux.arch import FluxArch
from .sd3.arch import Sd3Arch
from .sd_unet import SdUnetArch

LDM_PREFIX = "model.diffusion_model."
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Tried in order; the first that claims a file's keys builds it.
ARCHITECTURES: tuple[Architecture, ...] = (SdUnetArch(), FluxArch(), Sd3Arch())


def _prefix(keys: object) -> str:
    return LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in keys) else ""  # type: ignore[attr-defined]


def read_safetensors_model(path: Path) -> dict[str, torch.Tensor]:
    """The diffusion-model tensors of a checkpoint or standalone file, prefix stripped."""
    return load_state_dict(path, prefix=_prefix(load_shapes(path)))


def detect_precision(sd: StateDict, requested: str) -> str:
    """A GGUF file is 'gguf'; a file stored in fp8 is served as fp8; anything else as requested."""
    values = list(sd.values())
    if any(isinstance(v, QuantizedWeight) for v in values):
        return "gguf"
    if any(v.dtype in FP8_DTYPES for v in values):
        return "fp8"
    return requested


def architecture_of(sd: Mapping[str, torch.Tensor | QuantizedWeight], source: str) -> Architecture:
    """The plug-in that claims these tensors; a clear error naming what the file looks like otherwise."""
    shapes = {k: torch.Size(v.shape) for k, v in sd.items()}
    for arch in ARCHITECTURES:
        if arch.claims(shapes):
            return arch
    info = detect({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    unet = info.get("unet")
    if unet is not None and unet.layout == "diffusers":
        raise ModelLoadError(
            f"{source} is a diffusers-layout UNet; only the original layouts are loaded",
            hint="use the single-file checkpoint or an LDM-layout unet/ file",
        )
    kinds = ", ".join(c.kind for c in info.components) or "no known model"
    raise ModelLoadError(
        f"{source} holds no diffusion model this service knows (found: {kinds})",
        hint="SD1.5/SDXL UNets (LDM layout) and Flux / SD3 DiTs are served",
    )


def read_diffusion_state_dict(path: Path) -> StateDict:
    """A file's diffusion-model tensors (safetensors or GGUF), prefix stripped; corrupt files -> 4xx."""
    try:
        if is_gguf(path):
            return read_gguf(path, LDM_PREFIX)[0]
        return dict(read_safetensors_model(path))
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors / gguf raise their own types for corrupt files
        raise ModelLoadError(f"cannot read {path.name}: {error_reason(exc)}") from None


def load_diffusion_model(
    name: str,
    path: Path,
    precision: str,
    device: torch.device,
    per_architecture: Mapping[str, str] | None = None,
) -> DiffusionModel:
    """Read `path` and build its network on `device` in `precision`, or in `per_architecture[arch.name]`
    for its architecture (unless the file fixes it: GGUF weights stay quantized and compute in the
    precision's dtype; fp8 files compute in bf16)."""
    started = time.monotonic()
    sd = read_diffusion_state_dict(path)
    quant_types: dict[str, int] = {}  # GGUF files: tensors per storage type
    if any(isinstance(v, QuantizedWeight) for v in sd.values()):
        for v in sd.values():
            kind = v.qtype.name if isinstance(v, QuantizedWeight) else str(v.dtype).removeprefix("torch.")
            quant_types[kind] = quant_types.get(kind, 0) + 1
    arch = architecture_of(sd, path.name)
    precision = (per_architecture or {}).get(arch.name, precision)
    dtype = compute_dtype(precision)
    precision = detect_precision(sd, precision)
    if precision == "fp8":
        dtype = compute_dtype("fp8")
    model = arch.build(sd, Loaded(name, path, precision, dtype, device))
    model.nbytes = resident_bytes(model.module)
    model.load_seconds = time.monotonic() - started
    model.quant_types = quant_types
    return model
