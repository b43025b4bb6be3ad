"""Text-encoder sets addressed by name: a checkpoint, a clip/ file, or `+`-joined files.

- `checkpoints/x.safetensors` (SD1.5: CLIP-L under `cond_stage_model.transformer.`; SDXL: CLIP-L under
  `conditioner.embedders.0.transformer.`, CLIP-G in OpenCLIP layout under `conditioner.embedders.1.model.`;
  SD3/SD3.5: `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` in HF layout);
- `clip/clip_l.safetensors`: an SD1.5 text encoder;
- `clip/clip_l.safetensors+clip/clip_g.safetensors` (any order): SDXL's pair;
- `clip_l.safetensors+t5xxl_fp16.safetensors`: Flux's pair (ComfyUI's DualCLIPLoader type flux);
- `clip_l+clip_g+t5xxl`, a lone T5, or any other CLIP-L/CLIP-G/T5 set: SD3.
The family a name gets is its default; a request may ask for another one its encoders allow (`sd3`
for a Flux pair or an SDXL pair, as DualCLIPLoader type=sd3 does): see `families`.
Only the text-encoder tensors of a checkpoint are read. A model's identity for the conditioning cache
is the sha256 of its encoder weights, so the same encoders in two files share cache entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from luna_stack.lora.side import LoraSlots, attach_side_paths
from luna_stack.weights.checkpoint import detect, load_shapes, load_state_dict
from luna_stack.weights.ldm_layout import clip_hf_canonical, clip_openclip_to_hf
from luna_stack.weights.paths import ModelRoots
from luna_stack.weights.precision import QuantizedWeight
from luna_stack.wire.errors import BadRequest, ModelLoadError
from luna_stack.wire.tensors import dtype_name

from .encoders import ClipEncoder
from .t5_encoder import T5Encoder, read_gguf_t5
from .tokenize import CLIP_G, CLIP_L, EncoderSpec

Family = Literal["sd15", "sdxl", "flux", "sd3"]
_EXACT: dict[frozenset[str], Family] = {
    frozenset({"l"}): "sd15",
    frozenset({"l", "g"}): "sdxl",
    frozenset({"l", "t5xxl"}): "flux",
}
_KEYS = {"clip_l": "l", "clip_g": "g", "t5xxl": "t5xxl"}
_NAMES = {"l": "CLIP-L", "g": "CLIP-G", "t5xxl": "T5-XXL"}
FOLDERS = ("checkpoints", "clip", "text_encoders")  # text_encoders/: ComfyUI's newer name for clip/


@dataclass
class ClipModel:
    name: str
    family: Family  # the default family of this encoder set
    encoders: dict[str, ClipEncoder | T5Encoder]  # "l", "g", "t5xxl": the ones the files hold
    files: tuple[Path, ...]
    content_id: str
    slots: dict[str, LoraSlots] = field(default_factory=dict)
    graphs: dict[str, Any] = field(default_factory=dict)  # encoder key -> GraphRunner (encoder_graphs.py)

    def __post_init__(self) -> None:
        self.slots = {key: attach_side_paths(enc.model) for key, enc in self.encoders.items()}

    @property
    def specs(self) -> list[EncoderSpec]:
        """The CLIP encoders' token specs (T5 has its own tokenizer, t5_tokenize.py)."""
        return [spec for spec in (CLIP_L, CLIP_G) if spec.key in self.encoders]

    @property
    def clips(self) -> dict[str, ClipEncoder]:
        return {k: e for k, e in self.encoders.items() if isinstance(e, ClipEncoder)}

    @property
    def t5(self) -> T5Encoder | None:
        found = self.encoders.get("t5xxl")
        return found if isinstance(found, T5Encoder) else None

    @property
    def families(self) -> tuple[Family, ...]:
        """Families whose conditioning these encoders can give: the exact set's family, and SD3 for any
        set (its missing encoders give ComfyUI's zeros)."""
        exact = _EXACT.get(frozenset(self.encoders))
        return (exact, "sd3") if exact else ("sd3",)

    def pick_family(self, requested: object) -> Family:
        if requested is None:
            return self.family
        if requested not in self.families:
            raise BadRequest(
                f"model {self.name!r} ({', '.join(_NAMES[k] for k in self.encoders)}) cannot give "
                f"{requested!r} conditioning",
                hint=f"params.family may be {' or '.join(self.families)} for this model",
            )
        return requested  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for e in self.encoders.values() for p in e.model.parameters())

    def describe(self) -> dict[str, object]:
        from .t5_conditioning import widths  # conditioning imports this module

        cond_width, pooled_width = widths(self, self.family)
        return {
            "name": self.name,
            "family": self.family,
            "families": list(self.families),
            "encoders": {k: {"layers": e.num_layers, "width": e.width} for k, e in self.encoders.items()},
            "cond_width": cond_width,
            "dtype": dtype_name(next(next(iter(self.encoders.values())).model.parameters()).dtype),
            "pooled_width": pooled_width,
            "bytes": self.nbytes,
        }


def _encoder_weights(path: Path) -> dict[str, dict[str, Any]]:
    """Canonical HF-layout text-encoder weights found in one file, by encoder key ("l", "g", "t5xxl")."""
    if path.suffix.lower() == ".gguf":
        return {"t5xxl": read_gguf_t5(path)}
    info = detect(load_shapes(path))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for part in info.components:
        key = _KEYS.get(part.kind)
        if key is None or key in found:
            continue
        sd = load_state_dict(path, prefix=part.prefix)
        if key == "t5xxl":
            found[key] = {k: v for k, v in sd.items() if k.startswith(("shared.", "encoder."))}
        else:
            found[key] = clip_openclip_to_hf(sd) if part.layout == "openclip" else clip_hf_canonical(sd)
    if not found:
        raise ModelLoadError(f"{path.name} holds no text encoder", details={"components": info.kind})
    return found


def _content_id(weights: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        for name in sorted(weights[key]):
            value = weights[key][name]
            kind = value.qtype.name if isinstance(value, QuantizedWeight) else value.dtype
            t = value.raw if isinstance(value, QuantizedWeight) else value.contiguous()
            digest.update(f"{key}:{name}:{kind}:{tuple(value.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def load_clip_model(
    name: str, roots: ModelRoots, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ClipModel:
    paths = tuple(roots.resolve(part.strip(), FOLDERS) for part in name.split("+"))
    weights: dict[str, dict[str, Any]] = {}
    for path in paths:
        for key, sd in _encoder_weights(path).items():
            if key in weights:
                raise BadRequest(f"model {name!r} names two {_NAMES[key]} encoders")
            weights[key] = sd
    if set(weights) == {"g"}:
        raise BadRequest(
            f"model {name!r} has only CLIP-G; SDXL needs CLIP-L too",
            hint="name the pair as 'clip_l.safetensors+clip_g.safetensors'",
        )
    family = _EXACT.get(frozenset(weights), "sd3")
    content_id = _content_id(weights)
    encoders: dict[str, ClipEncoder | T5Encoder] = {
        key: T5Encoder.from_state_dict(sd, device=device, dtype=dtype)
        if key == "t5xxl"
        else ClipEncoder.from_state_dict(key, sd, device=device, dtype=dtype)
        for key, sd in weights.items()
    }
    return ClipModel(name, family, encoders, paths, content_id)
