"""Bind a parsed LoRA file to the module names of one model (UNet2DConditionModel, CLIPTextModel, ...).

Names in a file are matched against a per-model index of the modules a LoRA can adapt (nn.Linear and
plain nn.Conv2d). The index holds, per module, the aliases a file may use for it:

- the module's own dotted name (diffusers / transformers path);
- for the UNet, the original LDM path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), from
  ldm_layout's module-name map, since SDXL kohya files and `diffusion_model.` files use it;
- for CLIP, the path with and without `text_model.` (transformers 5.6 dropped that level);
- aliases the model's architecture registers (`register_aliases`), e.g. Flux's BFL paths: one file
  module may be computed by several of the model's modules, each owning some rows of its output (a
  fused qkv projection is diffusers' to_q, to_k, to_v). A LoRA on it is exact on the parts: each part
  takes the up factor's rows of its output and shares the down factor;
- each of these underscore-joined, for kohya names (ambiguous joins are dropped, never guessed).

Factors are reshaped to the module (a Linear takes 1x1-conv factors and the other way round), checked
against its in/out features and kernel, and moved to its device and compute dtype.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from luna_stack.lora.format import Component, LoraFactors, LoraFile
from luna_stack.weights.ldm_layout import unet_ldm_to_diffusers_module_names
from luna_stack.wire.errors import BadRequest, ModelLoadError

log = logging.getLogger(__name__)

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_adaptable(module: nn.Module) -> bool:
    """Modules the side path can adapt: Linear (incl. quantized subclasses) and plain zero-padded Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and is_adaptable(m)}


@dataclass(frozen=True)
class AliasPart:
    """A model module computing some rows of an aliased (possibly fused) module's output."""

    module: str  # the model's module name
    rows: tuple[tuple[int, int], ...] = ()  # the aliased output's rows it computes, in its order; () = all


Parts = tuple[AliasPart, ...]


@dataclass(frozen=True)
class ModuleIndex:
    modules: dict[str, nn.Module]
    dotted: dict[str, Parts]  # alias -> the modules computing it
    flat: dict[str, Parts]  # underscore-joined alias -> the same


@dataclass(frozen=True, eq=False)  # identity equality: a stack compares its adapters by object
class ResolvedLora:
    """A LoRA file's factors for one component, keyed by module name in one model."""

    name: str
    component: Component
    factors: Mapping[str, LoraFactors]  # Linear: 2-D factors, Conv2d: 4-D factors
    unmatched: tuple[str, ...]  # file names that matched no module of the model
    model_ref: weakref.ref[nn.Module]

    def belongs_to(self, model: nn.Module) -> bool:
        return self.model_ref() is model


_INDEXES: weakref.WeakKeyDictionary[nn.Module, dict[Component, ModuleIndex]] = weakref.WeakKeyDictionary()
_ALIASES: weakref.WeakKeyDictionary[nn.Module, dict[Component, Mapping[str, Parts]]] = (
    weakref.WeakKeyDictionary()
)


def register_aliases(model: nn.Module, component: Component, aliases: Mapping[str, Parts]) -> None:
    """Names LoRA files use for `model`'s modules besides their own (before the first resolve)."""
    _ALIASES.setdefault(model, {})[component] = dict(aliases)
    _INDEXES.get(model, {}).pop(component, None)


def _unet_ldm_aliases(model: nn.Module) -> dict[str, str]:
    """LDM module path -> diffusers module path, for a diffusers UNet2DConditionModel."""
    config = getattr(model, "config", None)
    if config is None or "down_block_types" not in config:
        return {}
    try:
        return unet_ldm_to_diffusers_module_names(config)
    except (ModelLoadError, KeyError) as exc:  # a UNet outside the SD1.5/SDXL layout: no LDM names
        log.warning("LDM-named LoRA keys cannot match this UNet: %s", exc)
        return {}


def _build_index(model: nn.Module, component: Component) -> ModuleIndex:
    modules = adaptable_modules(model)
    names: dict[str, str] = {name: name for name in modules}
    if component == "unet":
        for ldm, diffusers in _unet_ldm_aliases(model).items():
            if diffusers in modules:
                names.setdefault(ldm, diffusers)
    elif component != "t5xxl":  # CLIP files say text_model.*; transformers >= 5.6 CLIPTextModel has none
        for name in modules:
            prefixed = name.startswith("text_model.")
            names.setdefault(name.removeprefix("text_model.") if prefixed else f"text_model.{name}", name)
    dotted: dict[str, Parts] = {alias: (AliasPart(name),) for alias, name in names.items()}
    for alias, parts in _ALIASES.get(model, {}).get(component, {}).items():
        if all(p.module in modules for p in parts):
            dotted.setdefault(alias, tuple(parts))
    flat: dict[str, Parts] = {}
    ambiguous: set[str] = set()
    for alias, parts in dotted.items():
        key = alias.replace(".", "_")
        if flat.setdefault(key, parts) != parts:
            ambiguous.add(key)
    for key in ambiguous:
        del flat[key]
    return ModuleIndex(modules, dotted, flat)


def module_index(model: nn.Module, component: Component) -> ModuleIndex:
    """The model's alias index for one component, built once per model."""
    per_model = _INDEXES.setdefault(model, {})
    if component not in per_model:
        per_model[component] = _build_index(model, component)
    return per_model[component]


def _module_shape(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d({module.in_channels}→{module.out_channels}, {kh}x{kw})"
    return f"Linear({module.in_features}→{module.out_features})"


def _fit(lora: str, name: str, module: nn.Module, f: LoraFactors, dtype: torch.dtype) -> LoraFactors:
    """Factors reshaped for `module` (2-D for Linear, 4-D for Conv2d), on its device, in `dtype`."""
    down, up = f.down, f.up
    rank = down.shape[0]
    if isinstance(module, nn.Conv2d):
        in_dim, out_dim = module.in_channels, module.out_channels
        kernel = tuple(module.kernel_size)
        if down.dim() == 2 and kernel == (1, 1):
            down = down.reshape(rank, -1, 1, 1)
        ok = down.dim() == 4 and down.shape[1] == in_dim and tuple(down.shape[2:]) == kernel
        up = up.reshape(up.shape[0], rank, 1, 1)
    else:
        in_dim, out_dim = module.in_features, module.out_features
        if down.dim() == 4 and tuple(down.shape[2:]) == (1, 1):
            down = down.reshape(rank, -1)
        ok = down.dim() == 2 and down.shape[1] == in_dim
        up = up.reshape(up.shape[0], rank)
    if not ok or up.shape[0] != out_dim:
        raise BadRequest(
            f"LoRA {lora} does not fit module {name}: factors down {list(f.down.shape)}, "
            f"up {list(f.up.shape)} vs the module's {_module_shape(module)}",
            hint="the LoRA was trained for a model of another size or architecture",
        )
    device = module.weight.device
    return LoraFactors(down.to(device, dtype), up.to(device, dtype), f.alpha)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype in _COMPUTE_DTYPES:
            return p.dtype
    raise ValueError("cannot infer the model's compute dtype (quantized weights): pass dtype= to resolve()")


def resolve(
    lora: LoraFile,
    model: nn.Module,
    component: Component,
    *,
    dtype: torch.dtype | None = None,
    model_name: str | None = None,
) -> ResolvedLora:
    """Bind `lora`'s factors for `component` to `model`'s modules.

    Unmatched names are logged and kept in `unmatched` (ComfyUI: "lora key not loaded"). A file with keys
    for the component of which none match, or factors whose shapes do not fit, is a BadRequest. A file
    with no keys for the component resolves to an empty adapter (e.g. a UNet-only LoRA on CLIP).
    """
    index = module_index(model, component)
    dtype = dtype or _compute_dtype(model)
    targets = lora.for_component(component)
    factors: dict[str, LoraFactors] = {}
    unmatched: list[str] = []
    for target in targets:
        parts = (index.flat if target.flat else index.dotted).get(target.name)
        if parts is None:
            unmatched.append(target.name)
            continue
        fused_rows = max((b for p in parts for _, b in p.rows), default=None)
        if fused_rows is not None and target.factors.up.shape[0] != fused_rows:
            raise BadRequest(
                f"LoRA {lora.name}: {target.name} has {target.factors.up.shape[0]} output rows, the "
                f"modules it adapts ({', '.join(p.module for p in parts)}) {fused_rows}",
                hint="the LoRA was trained for a model of another size or architecture",
            )
        for part in parts:
            if part.module in factors:
                raise BadRequest(
                    f"LoRA {lora.name} has two factor pairs for module {part.module} (one is {target.name})"
                )
            f = target.factors
            if part.rows:
                f = LoraFactors(f.down, torch.cat([f.up[a:b] for a, b in part.rows]), f.alpha)
            factors[part.module] = _fit(lora.name, part.module, index.modules[part.module], f, dtype)
    if targets and not factors:
        raise BadRequest(
            f"LoRA {lora.name} does not fit model {model_name or type(model).__name__}: 0 of {len(targets)} "
            f"{component} modules matched — is it for another architecture?",
            details={"component": component, "sample_keys": unmatched[:5]},
        )
    for key in unmatched:
        log.warning("lora key not loaded: %s (%s, %s)", key, lora.name, component)
    return ResolvedLora(lora.name, component, factors, tuple(unmatched), weakref.ref(model))
