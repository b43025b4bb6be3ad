"""LoRA files: read the kohya, diffusers/PEFT and LDM-named layouts into one `LoraFile`.

A LoRA file is a safetensors state dict of low-rank factor pairs. Three naming families exist in the wild:

- kohya: `lora_unet_<path with _>` (DiT trainers: `lora_transformer_`) / `lora_te_` (SD1.5 CLIP-L) /
  `lora_te1_` (SDXL CLIP-L) / `lora_te2_` (SDXL CLIP-G) / T5-XXL as ComfyUI's model_lora_keys_clip names
  it: `lora_te2_` in Flux files (CLIP-L + T5), `lora_te3_` in SD3 files, told from CLIP-G by the T5 module
  path (`encoder_block_N_...`); tensors `.lora_down.weight`, `.lora_up.weight`, `.alpha`. The
  underscore-joined path is ambiguous; it is matched against a model's module names later (see
  lora_resolve).
- diffusers/PEFT: `unet.` / `transformer.` (DiTs) / `text_encoder.` / `text_encoder_2.` (or no prefix,
  or `base_model.model.`), tensors `.lora_A.weight` / `.lora_B.weight`; older diffusers wrote
  `.lora.down.weight`, `.lora_linear_layer.down.weight` or `<attn>.processor.to_q_lora.down.weight`.
  Alpha may be absent (then alpha = rank) or stored as PEFT config in the safetensors metadata
  `lora_adapter_metadata`.
- LDM: `diffusion_model.` / `model.diffusion_model.` + the original UNet (or DiT: BFL's Flux) module
  path, with either pair of tensor suffixes.
- ComfyUI's generic text-encoder names: `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` + the module
  path of the HF model.

Parsing only checks the file's own consistency; binding to a model is `lora_resolve.resolve`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import safetensors.torch
import torch

from luna_stack.wire.errors import ModelLoadError

Component = Literal["unet", "clip_l", "clip_g", "t5xxl"]
COMPONENTS: tuple[Component, ...] = ("unet", "clip_l", "clip_g", "t5xxl")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: delta(x) = (alpha / rank) · up(down(x))."""

    down: torch.Tensor  # A: [rank, in] or conv [rank, in, kh, kw]
    up: torch.Tensor  # B: [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraFactors:
        return LoraFactors(self.down.to(device, dtype), self.up.to(device, dtype), self.alpha)


@dataclass(frozen=True)
class LoraTarget:
    component: Component
    name: str  # module path as written in the file, prefix and tensor suffix removed
    flat: bool  # kohya underscore-joined path: matched against module names with "." replaced by "_"
    factors: LoraFactors


@dataclass(frozen=True)
class LoraFile:
    name: str
    format: str  # "kohya", "peft", "diffusers", "ldm"; "+"-joined when a file mixes them
    targets: tuple[LoraTarget, ...]
    ignored: tuple[str, ...] = field(default=())  # keys of no known LoRA layout (counted, not fatal)

    @property
    def components(self) -> tuple[Component, ...]:
        present = {t.component for t in self.targets}
        return tuple(c for c in COMPONENTS if c in present)

    @property
    def rank(self) -> int:
        return max(t.factors.rank for t in self.targets)

    @property
    def nbytes(self) -> int:
        return sum(t.factors.nbytes for t in self.targets)

    def for_component(self, component: Component) -> tuple[LoraTarget, ...]:
        return tuple(t for t in self.targets if t.component == component)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraFile:
        targets = tuple(
            LoraTarget(t.component, t.name, t.flat, t.factors.to(device, dtype)) for t in self.targets
        )
        return LoraFile(self.name, self.format, targets, self.ignored)


# (key suffix, role); longest suffixes first so ".lora_linear_layer.down.weight" is not read as ".down...".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
_OLD_DIFFUSERS_SUFFIXES = (".lora_linear_layer.", ".lora.down.", ".lora.up.")
# Old diffusers attention processors: "<attn>.processor.to_q_lora.down.weight" adapts "<attn>.to_q".
_PROCESSOR_KEY = re.compile(
    r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
# (prefix, component, flat names, format the prefix implies or None when the suffix decides)
_PREFIXES: tuple[tuple[str, Component, bool, str | None], ...] = (
    ("lora_unet_", "unet", True, "kohya"),
    ("lora_transformer_", "unet", True, "kohya"),  # DiT trainers' kohya names over diffusers paths
    ("lora_te1_", "clip_l", True, "kohya"),
    ("lora_te2_", "clip_g", True, "kohya"),
    ("lora_te3_", "t5xxl", True, "kohya"),
    ("lora_te_", "clip_l", True, "kohya"),
    ("text_encoders.clip_l.transformer.", "clip_l", False, None),
    ("text_encoders.clip_g.transformer.", "clip_g", False, None),
    ("text_encoders.t5xxl.transformer.", "t5xxl", False, None),
    ("model.diffusion_model.", "unet", False, "ldm"),
    ("diffusion_model.", "unet", False, "ldm"),
    ("text_encoder_2.", "clip_g", False, None),
    ("text_encoder.", "clip_l", False, None),
    ("unet.", "unet", False, None),
    ("transformer.", "unet", False, None),  # diffusers' DiT pipelines (Flux, SD3) name the network so
)
# Other adapter algorithms whose down/up pairs alone would give a wrong result: refuse, never approximate.
_UNSUPPORTED = {
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "dora_scale": "DoRA",
    "lora_mid": "LoCon Tucker (lora_mid)",
}
_T5_FLAT_PREFIX = "encoder_block_"  # T5 module paths (`encoder.block.N...`), kohya-joined
_PEFT_METADATA_PREFIXES: dict[Component, tuple[str, ...]] = {
    "unet": ("unet", "transformer"),  # diffusers' DiT pipelines call the network transformer
    "clip_l": ("text_encoder",),
    "clip_g": ("text_encoder_2",),
}


def _split_key(key: str) -> tuple[str, str] | None:
    """(module path with prefix, role) or None when the key is not a LoRA tensor."""
    m = _PROCESSOR_KEY.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['attn']}.{proj}", m["role"]
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _key_format(key: str, prefix_format: str | None) -> str:
    if prefix_format:
        return prefix_format
    if ".processor." in key or any(s in key for s in _OLD_DIFFUSERS_SUFFIXES):
        return "diffusers"
    return "peft"


def _locate(path: str) -> tuple[Component, str, bool, str | None]:
    """(component, module path, flat, prefix format) of a module path whose prefix says where it belongs."""
    path = path.removeprefix("base_model.model.")
    for prefix, component, flat, fmt in _PREFIXES:
        if path.startswith(prefix):
            module = path[len(prefix) :]
            if flat and prefix.startswith("lora_te") and module.startswith(_T5_FLAT_PREFIX):
                component = "t5xxl"  # OneTrainer / kohya Flux and SD3 files: T5 under lora_te2_ / lora_te3_
            return component, module, flat, fmt
    if path.startswith("lora_"):
        raise KeyError(path)  # kohya prefix of another model family (lora_prior_unet_, ...)
    return "unet", path, False, None  # PEFT save of a bare UNet has no prefix


def _peft_alphas(
    metadata: Mapping[str, str] | None,
) -> dict[Component, tuple[float | None, dict[str, float]]]:
    """Per component: (lora_alpha, alpha_pattern) from diffusers' `lora_adapter_metadata` (PEFT config)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"LoRA metadata 'lora_adapter_metadata' is not JSON: {exc}") from exc
    out: dict[Component, tuple[float | None, dict[str, float]]] = {}
    for component, prefixes in _PEFT_METADATA_PREFIXES.items():
        present = [p for p in prefixes if f"{p}.lora_alpha" in config or f"{p}.alpha_pattern" in config]
        if not present:
            continue
        alpha = config.get(f"{present[0]}.lora_alpha")
        pattern = config.get(f"{present[0]}.alpha_pattern") or {}
        if alpha is not None or pattern:
            out[component] = (
                None if alpha is None else float(alpha),
                {k: float(v) for k, v in pattern.items()},
            )
    return out


def _peft_alpha(module: str, default: float | None, pattern: Mapping[str, float]) -> float | None:
    # PEFT matches alpha_pattern keys as a regex on the module path's tail (peft.utils.get_pattern_key).
    for key, alpha in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return alpha
    return default


def _alpha_value(name: str, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise ModelLoadError(f"LoRA {name}: {key} must hold one number, has shape {list(tensor.shape)}")
    value = float(tensor.reshape(()).float())
    if value != value or value in (float("inf"), float("-inf")):
        raise ModelLoadError(f"LoRA {name}: {key} is not finite ({value})")
    return value


def _check_pair(name: str, module: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        raise ModelLoadError(
            f"LoRA {name}: factors of {module} must be 2-D or 4-D, "
            f"got down {list(down.shape)} up {list(up.shape)}"
        )
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise ModelLoadError(f"LoRA {name}: up factor of {module} must be a 1x1 conv, got {list(up.shape)}")
    if down.shape[0] != up.shape[1]:
        raise ModelLoadError(
            f"LoRA {name}: rank mismatch in {module}: down {list(down.shape)} vs up {list(up.shape)}"
        )
    for role, t in (("down", down), ("up", up)):
        if not t.is_floating_point():
            raise ModelLoadError(f"LoRA {name}: {role} factor of {module} has non-float dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"LoRA {name}: {role} factor of {module} contains NaN or inf")


def parse_lora(
    state_dict: Mapping[str, torch.Tensor], name: str = "<lora>", metadata: Mapping[str, str] | None = None
) -> LoraFile:
    """Group a LoRA state dict into per-module factor pairs; raise ModelLoadError for a broken file."""
    for key in state_dict:
        for marker, algorithm in _UNSUPPORTED.items():
            if f".{marker}" in key:
                raise ModelLoadError(
                    f"LoRA {name} is a {algorithm} adapter ({key}); only plain LoRA/LoCon is supported",
                    hint="convert it to a plain LoRA, or use a LoRA/LoCon file",
                )
    parts: dict[tuple[Component, str, bool], dict[str, torch.Tensor]] = {}
    formats: set[str] = set()
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            ignored.append(key)
            continue
        path, role = split
        try:
            component, module, flat, prefix_format = _locate(path)
        except KeyError:
            ignored.append(key)
            continue
        slot = parts.setdefault((component, module, flat), {})
        if role in slot:
            raise ModelLoadError(f"LoRA {name}: two {role} tensors for module {module} (one is {key})")
        slot[role] = tensor
        if role != "alpha":
            formats.add(_key_format(key, prefix_format))

    peft_alphas = _peft_alphas(metadata)
    targets: list[LoraTarget] = []
    for (component, module, flat), slot in parts.items():
        if "down" not in slot or "up" not in slot:
            if set(slot) == {"alpha"}:  # an alpha with no factors (pruned module): nothing to apply
                continue
            missing = "up" if "down" in slot else "down"
            raise ModelLoadError(f"LoRA {name}: module {module} of {component} has no {missing} factor")
        down, up = slot["down"], slot["up"]
        _check_pair(name, module, down, up)
        if "alpha" in slot:
            alpha: float | None = _alpha_value(name, f"{module}.alpha", slot["alpha"])
        else:
            default, pattern = peft_alphas.get(component, (None, {}))
            alpha = _peft_alpha(module, default, pattern)
        factors = LoraFactors(down, up, float(down.shape[0]) if alpha is None else alpha)
        targets.append(LoraTarget(component, module, flat, factors))
    if not targets:
        raise ModelLoadError(
            f"LoRA {name} holds no LoRA factors ({len(state_dict)} tensors, none in a known LoRA layout)",
            details={"sample_keys": sorted(state_dict)[:5]},
        )
    targets.sort(key=lambda t: (COMPONENTS.index(t.component), t.name))
    return LoraFile(name, "+".join(sorted(formats)), tuple(targets), tuple(sorted(ignored)))


def load_lora_bytes(data: bytes, name: str) -> LoraFile:
    """Parse a safetensors LoRA from its bytes (never pickle); an unreadable file is a ModelLoadError."""
    try:
        state_dict = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises SafetensorError, ValueError or others for bad headers
        raise ModelLoadError(f"LoRA {name} is not a readable safetensors file: {exc}") from exc
    return parse_lora(state_dict, name, _safetensors_metadata(data))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The header is an 8-byte little-endian length then JSON; safetensors.torch.load has validated it.
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
