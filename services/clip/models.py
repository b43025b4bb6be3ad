"""Text-encoder sets addressed by name: a checkpoint, a clip/ file, or a `clip_l+clip_g` pair.

- `checkpoints/x.safetensors` (SD1.5: CLIP-L under `cond_stage_model.transformer.`; SDXL: CLIP-L under
  `conditioner.embedders.0.transformer.`, CLIP-G in OpenCLIP layout under `conditioner.embedders.1.model.`);
- `clip/clip_l.safetensors`: an SD1.5 text encoder;
- `clip/clip_l.safetensors+clip/clip_g.safetensors` (either order): SDXL's pair.
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
from luna_stack.wire.errors import BadRequest, ModelLoadError
from luna_stack.wire.tensors import dtype_name

from .encoders import ClipEncoder
from .tokenize import CLIP_G, CLIP_L, EncoderSpec

Family = Literal["sd15", "sdxl"]
FOLDERS = ("checkpoints", "clip", "text_encoders")  # text_encoders/: ComfyUI's newer name for clip/


@dataclass
class ClipModel:
    name: str
    family: Family
    encoders: dict[str, ClipEncoder]  # "l" and, for SDXL, "g"
    files: tuple[Path, ...]
    content_id: str
    slots: dict[str, LoraSlots] = field(default_factory=dict)
    graphs: dict[str, Any] = field(default_factory=dict)  # encoder key -> GraphRunner (encoder_graphs.py)

    def __post_init__(self) -> None:
        self.slots = {key: attach_side_paths(enc.model) for key, enc in self.encoders.items()}

    @property
    def specs(self) -> list[EncoderSpec]:
        return [CLIP_L, CLIP_G] if self.family == "sdxl" else [CLIP_L]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for e in self.encoders.values() for p in e.model.parameters())

    def describe(self) -> dict[str, object]:
        pooled = self.encoders["g"].projection if self.family == "sdxl" else None
        return {
            "name": self.name,
            "family": self.family,
            "encoders": {k: {"layers": e.num_layers, "width": e.width} for k, e in self.encoders.items()},
            "cond_width": sum(e.width for e in self.encoders.values()),
            "dtype": dtype_name(next(next(iter(self.encoders.values())).model.parameters()).dtype),
            "pooled_width": pooled.out_features if pooled is not None else self.encoders["l"].width,
            "bytes": self.nbytes,
        }


def _encoder_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical HF-layout CLIP weights found in one file, by encoder key ("l", "g")."""
    info = detect(load_shapes(path))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for part in info.components:
        if part.kind not in ("clip_l", "clip_g"):
            continue
        sd = load_state_dict(path, prefix=part.prefix)
        found[part.kind[-1]] = clip_openclip_to_hf(sd) if part.layout == "openclip" else clip_hf_canonical(sd)
    if not found:
        raise ModelLoadError(f"{path.name} holds no CLIP text encoder", details={"components": info.kind})
    return found


def _content_id(weights: dict[str, dict[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        for name in sorted(weights[key]):
            t = weights[key][name].contiguous()
            digest.update(f"{key}:{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def load_clip_model(
    name: str, roots: ModelRoots, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ClipModel:
    paths = tuple(roots.resolve(part.strip(), FOLDERS) for part in name.split("+"))
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        for key, sd in _encoder_weights(path).items():
            if key in weights:
                raise BadRequest(f"model {name!r} names two CLIP-{key.upper()} encoders")
            weights[key] = sd
    if set(weights) == {"l"}:
        family: Family = "sd15"
    elif set(weights) == {"l", "g"}:
        family = "sdxl"
    else:
        raise BadRequest(
            f"model {name!r} has only CLIP-G; SDXL needs CLIP-L too",
            hint="name the pair as 'clip_l.safetensors+clip_g.safetensors'",
        )
    content_id = _content_id(weights)
    encoders = {
        key: ClipEncoder.from_state_dict(key, sd, device=device, dtype=dtype) for key, sd in weights.items()
    }
    return ClipModel(name, family, encoders, paths, content_id)
