"""Random-weight checkpoints in the real key layouts, full size or small, written as safetensors.

The architectures are diffusers' / transformers' own, built from the configs below; the weights get
torch's default initialisation from a seed, so a file is deterministic. Files are written in the
layouts ComfyUI users have (LDM single-file checkpoints, standalone vae/, clip/, unet/ files), so
detection and loading are exercised exactly as with real files.

Memory: models are built on the meta device and materialised one block at a time (fp32, then cast),
each block written to the file and freed; a full SDXL checkpoint never needs more than its largest
block in fp32 plus one cast copy.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from luna_stack.weights import ldm_layout

Tensor = torch.Tensor
Family = Literal["sd15", "sdxl"]
Size = Literal["small", "full"]
ClipWhich = Literal["l", "g"]

# ------------------------------------------------------------------------------------------ configs

_VAE = {
    "full": {"block_out_channels": [128, 256, 512, 512]},
    # four levels keep the 8x downscale of the real VAE
    "small": {"block_out_channels": [32, 32, 64, 64]},
}
_VAE_COMMON = {"layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "in_channels": 3}

_CLIP = {
    ("l", "full"): {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072},
    ("g", "full"): {"hidden_size": 1280, "num_hidden_layers": 32, "intermediate_size": 5120},
    ("l", "small"): {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 128},
    ("g", "small"): {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256},
}
_CLIP_ACT = {"l": "quick_gelu", "g": "gelu"}
# SDXL's `y`: pooled CLIP-G output ++ six 256-wide Fourier embeddings of sizes and crop.
_SDXL_SIZE_EMBED = 6 * 256


def clip_config(which: ClipWhich, size: Size) -> dict[str, Any]:
    """transformers CLIPTextConfig kwargs of CLIP-L / CLIP-G (heads are 64 wide, at least one)."""
    base = _CLIP[(which, size)]
    return {
        **base,
        "num_attention_heads": max(1, base["hidden_size"] // 64),
        "projection_dim": base["hidden_size"],
        "hidden_act": _CLIP_ACT[which],
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def vae_config(size: Size) -> dict[str, Any]:
    """diffusers AutoencoderKL kwargs; SD1.5 and SDXL VAEs share the architecture."""
    channels = _VAE[size]["block_out_channels"]
    return {
        **_VAE_COMMON,
        "out_channels": 3,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


def unet_config(family: Family, size: Size, depth: Sequence[int] | None = None) -> dict[str, Any]:
    """diffusers UNet2DConditionModel kwargs of the SD1.5 / SDXL UNet (small: same structure, narrow).

    `depth`: transformer layers per level instead of the family's, e.g. SDXL_LITE_DEPTH."""
    common = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32}
    if family == "sd15":
        channels = [320, 640, 1280, 1280] if size == "full" else [32, 64]
        attention = [True] * (len(channels) - 1) + [False]
        return {
            **common,
            "block_out_channels": channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "transformer_layers_per_block": [1] * len(channels),
            "cross_attention_dim": clip_config("l", size)["hidden_size"],
            "attention_head_dim": 8,
            "use_linear_projection": False,
        }
    channels = [320, 640, 1280] if size == "full" else [64, 128]
    depth = list(depth or ([1, 2, 10] if size == "full" else [1, 2]))
    context = clip_config("l", size)["hidden_size"] + clip_config("g", size)["hidden_size"]
    return {
        **common,
        "block_out_channels": channels,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"],
        "transformer_layers_per_block": depth,
        "cross_attention_dim": context,
        "attention_head_dim": [c // 64 for c in channels],
        "use_linear_projection": True,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": clip_config("g", size)["projection_dim"] + _SDXL_SIZE_EMBED,
    }


# SDXL's widths, conditioning and block layout with 1 / 2 instead of 2 / 10 transformer layers in its
# attention levels (Segmind Vega's layout, which ComfyUI detects as an SDXL-family model): a quarter of the
# parameters, for full-size SDXL tests on a small host.
SDXL_LITE_DEPTH = (1, 1, 2)
# Channels of a ControlNet's hint encoder (diffusers' default: the original ControlNet's).
_HINT_CHANNELS = (16, 32, 96, 256)


def controlnet_config(family: Family, size: Size, depth: Sequence[int] | None = None) -> dict[str, Any]:
    """diffusers ControlNetModel kwargs for a ControlNet of `unet_config(family, size, depth)`: the same
    encoder half, a hint encoder for RGB images, a zero convolution per residual."""
    unet = unet_config(family, size, depth)
    shared = [
        "in_channels",
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "norm_num_groups",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "use_linear_projection",
        "class_embed_type",
        "projection_class_embeddings_input_dim",
    ]
    return {
        **{k: unet[k] for k in shared if k in unet},
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": list(_HINT_CHANNELS),
    }


def t2i_adapter_config(family: Family) -> dict[str, Any]:
    """diffusers T2IAdapter kwargs of the full-size adapters (SD1.5: pixel-unshuffle 8; SDXL: 16)."""
    xl = family == "sdxl"
    return {
        "in_channels": 3,
        "channels": [320, 640, 1280, 1280],
        "num_res_blocks": 2,
        "downscale_factor": 16 if xl else 8,
        "adapter_type": "full_adapter_xl" if xl else "full_adapter",
    }


# ------------------------------------------------------------------------------ streaming writer

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Materialise subtrees up to this many parameters at once (a CLIP-G layer, an SDXL transformer block).
_CHUNK_PARAMS = 64_000_000

Rename = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class _Part:
    """One model in a file: built on meta, renamed to the file layout, keys prefixed."""

    build: Callable[[], nn.Module]
    rename: Rename
    prefix: str
    seed: int


def _chunks(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Subtrees small enough to materialise at once, in module order.

    A module whose children are all leaves (an attention: q, k, v, out) is never split, because the
    OpenCLIP layout concatenates its q, k, v weights.
    """
    small = sum(p.numel() for p in module.parameters()) <= _CHUNK_PARAMS
    if small or not any(list(child.children()) for child in module.children()):
        yield path, module
        return
    if list(module.parameters(recurse=False)):
        raise ValueError(f"{path or 'model'}: direct parameters on a module too large to materialise whole")
    for name, child in module.named_children():
        yield from _chunks(child, f"{path}{name}.")


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# Blocks of a few MB land on glibc's heap once its mmap threshold has grown, and freed heap pages are not
# given back by themselves: without trimming, a full SDXL write peaks at ~6 GB RSS instead of ~0.5 GB.
_MALLOC_TRIM = _libc_malloc_trim()


def _materialise(module: nn.Module, path: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Default-initialise a meta subtree in fp32 on the CPU, return its weights cast, free it again."""
    module.to_empty(device="cpu")
    for sub in module.modules():
        if list(sub.parameters(recurse=False)):
            sub.reset_parameters()
    weights = {f"{path}{k}": v.detach().to(dtype) for k, v in module.state_dict().items()}
    module.to_empty(device="meta")
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return weights


def _meta_weights(module: nn.Module, path: str, dtype: torch.dtype) -> dict[str, Tensor]:
    return {f"{path}{k}": v.to(dtype) for k, v in module.state_dict().items()}


def _build(parts: Sequence[_Part]) -> list[tuple[_Part, nn.Module]]:
    models = [(part, part.build()) for part in parts]
    for _, model in models:
        if set(model.state_dict()) != {k for k, _ in model.named_parameters()}:
            raise ValueError(
                f"{type(model).__name__} has persistent buffers; fixtures only initialise parameters"
            )
    return models


def _file_layout(models: Sequence[tuple[_Part, nn.Module]], dtype: torch.dtype) -> dict[str, Tensor]:
    """Every key of the file, in write order, as a meta tensor of its final shape and dtype."""
    layout: dict[str, Tensor] = {}
    for part, model in models:
        for chunk_path, chunk in _chunks(model):
            for key, tensor in part.rename(_meta_weights(chunk, chunk_path, dtype)).items():
                layout[part.prefix + key] = tensor
    return layout


def _write(path: Path, parts: Sequence[_Part], dtype: torch.dtype, metadata: dict[str, str]) -> Path:
    """Write a safetensors file block by block: header from meta shapes first, then the data."""
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported fixture dtype {dtype}")
    models = _build(parts)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in _file_layout(models, dtype).items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for part, model in models:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(part.seed)
                for chunk_path, chunk in _chunks(model):
                    for key, tensor in part.rename(_materialise(chunk, chunk_path, dtype)).items():
                        if list(tensor.shape) != header[part.prefix + key]["shape"]:
                            raise RuntimeError(f"{key}: shape changed between header and data")
                        f.write(tensor.contiguous().view(torch.uint8).numpy())  # no bytes copy
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------- parts

# Each component gets its own seed stream, so e.g. write_vae(seed=s) holds the same weights as the
# VAE inside write_checkpoint(seed=s).
_SEED_OFFSET = {"unet": 0, "vae": 1, "clip_l": 2, "clip_g": 3, "control": 4}


def _seed(seed: int, kind: str) -> int:
    return seed * len(_SEED_OFFSET) + _SEED_OFFSET[kind]


def _on_meta(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.device("meta"):
            return factory()

    return build


def _vae_part(size: Size, seed: int, prefix: str) -> _Part:
    from diffusers import AutoencoderKL

    config = vae_config(size)
    blocks = len(config["block_out_channels"])
    return _Part(
        build=_on_meta(lambda: AutoencoderKL(**config)),
        rename=lambda sd: ldm_layout.vae_diffusers_to_ldm(sd, blocks),
        prefix=prefix,
        seed=_seed(seed, "vae"),
    )


def _unet_part(
    family: Family, size: Size, seed: int, prefix: str, depth: Sequence[int] | None = None
) -> _Part:
    from diffusers import UNet2DConditionModel

    config = unet_config(family, size, depth)
    return _Part(
        build=_on_meta(lambda: UNet2DConditionModel(**config)),
        rename=lambda sd: ldm_layout.unet_diffusers_to_ldm(sd, config),
        prefix=prefix,
        seed=_seed(seed, "unet"),
    )


def _clip_part(
    which: ClipWhich, size: Size, seed: int, prefix: str, layout: Literal["hf", "openclip"]
) -> _Part:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**clip_config(which, size))
    # CLIP-L checkpoints hold no text projection; CLIP-G's pooled output is projected.
    cls = CLIPTextModelWithProjection if which == "g" else CLIPTextModel
    rename = ldm_layout.clip_hf_to_openclip if layout == "openclip" else ldm_layout.clip_hf_canonical
    return _Part(
        build=_on_meta(lambda: cls(config)), rename=rename, prefix=prefix, seed=_seed(seed, f"clip_{which}")
    )


def _metadata(kind: str, family: str, size: Size, seed: int) -> dict[str, str]:
    return {"luna_fixture": kind, "family": family, "size": size, "seed": str(seed)}


def _checkpoint_parts(family: Family, size: Size, seed: int) -> list[_Part]:
    parts = [
        _unet_part(family, size, seed, "model.diffusion_model."),
        _vae_part(size, seed, "first_stage_model."),
    ]
    if family == "sd15":
        parts.append(_clip_part("l", size, seed, "cond_stage_model.transformer.", "hf"))
    else:
        parts.append(_clip_part("l", size, seed, "conditioner.embedders.0.transformer.", "hf"))
        parts.append(_clip_part("g", size, seed, "conditioner.embedders.1.model.", "openclip"))
    return parts


def write_checkpoint(
    path: str | Path,
    family: Family = "sd15",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """A single-file LDM checkpoint: UNet, VAE and the family's text encoder(s) under their prefixes."""
    parts = _checkpoint_parts(family, size, seed)
    return _write(Path(path), parts, dtype, _metadata("checkpoint", family, size, seed))


def checkpoint_shapes(
    family: Family = "sd15", size: Size = "full", dtype: torch.dtype = torch.float16
) -> dict[str, Tensor]:
    """The keys `write_checkpoint` would write, as meta tensors: a full-size layout without the bytes."""
    return _file_layout(_build(_checkpoint_parts(family, size, 0)), dtype)


def write_vae(
    path: str | Path,
    family: Family = "sd15",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """A standalone VAE file (vae/*.safetensors) in LDM naming, no prefix."""
    return _write(Path(path), [_vae_part(size, seed, "")], dtype, _metadata("vae", family, size, seed))


def write_unet(
    path: str | Path,
    family: Family = "sd15",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    depth: Sequence[int] | None = None,
) -> Path:
    """A standalone diffusion-model file (unet/*.safetensors) in LDM naming, no prefix."""
    part = _unet_part(family, size, seed, "", depth)
    return _write(Path(path), [part], dtype, _metadata("unet", family, size, seed))


def write_controlnet(
    path: str | Path,
    family: Family = "sd15",
    size: Size = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    depth: Sequence[int] | None = None,
) -> Path:
    """A ControlNet (controlnet/*.safetensors) in the original layout (`control_model.*`), for the UNet of
    the same family, size and depth. Random weights everywhere, the zero convolutions included, so its
    residuals are not zero."""
    from diffusers import ControlNetModel

    config = controlnet_config(family, size, depth)
    unet = unet_config(family, size, depth)
    hint_blocks = 2 * (len(_HINT_CHANNELS) - 1)
    part = _Part(
        build=_on_meta(lambda: ControlNetModel(**config)),
        rename=lambda sd: ldm_layout.controlnet_diffusers_to_ldm(sd, unet, hint_blocks),
        prefix="control_model.",
        seed=_seed(seed, "control"),
    )
    return _write(Path(path), [part], dtype, _metadata("controlnet", family, size, seed))


def write_t2i_adapter(
    path: str | Path, family: Family = "sd15", seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """A T2I-Adapter (t2i_adapter/*.safetensors) in diffusers' layout (`adapter.body.N.resnets.M.*`), which
    ComfyUI's ControlNet loader reads; full size (its residuals feed a full-size UNet)."""
    from diffusers import T2IAdapter

    config = t2i_adapter_config(family)
    part = _Part(
        build=_on_meta(lambda: T2IAdapter(**config)),
        rename=dict,
        prefix="",
        seed=_seed(seed, "control"),
    )
    return _write(Path(path), [part], dtype, _metadata("t2i_adapter", family, "full", seed))


def write_clip(
    path: str | Path,
    which: ClipWhich = "l",
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    layout: Literal["hf", "openclip"] = "hf",
) -> Path:
    """A standalone text encoder (clip/clip_l.safetensors, clip/clip_g.safetensors), HF or OpenCLIP names."""
    part = _clip_part(which, size, seed, "", layout)
    return _write(Path(path), [part], dtype, _metadata(f"clip_{which}", "any", size, seed))


def write_models_dir(
    root: str | Path,
    size: Size = "small",
    families: Sequence[Family] = ("sd15", "sdxl"),
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Path]:
    """A ComfyUI-layout models directory; returns the written files by a short name.

    checkpoints/<family>-<size>.safetensors, vae/<family>-<size>-vae.safetensors,
    unet/<family>-<size>-unet.safetensors, clip/clip_l.safetensors (+ clip_g for SDXL); loras/ and
    embeddings/ are created empty. Standalone files hold the same weights as the checkpoint's parts.
    """
    root = Path(root)
    for folder in ("checkpoints", "vae", "clip", "unet", "loras", "embeddings"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for family in families:
        stem = f"{family}-{size}"
        written[f"{family}_checkpoint"] = write_checkpoint(
            root / "checkpoints" / f"{stem}.safetensors", family, size, seed, dtype
        )
        written[f"{family}_vae"] = write_vae(
            root / "vae" / f"{stem}-vae.safetensors", family, size, seed, dtype
        )
        written[f"{family}_unet"] = write_unet(
            root / "unet" / f"{stem}-unet.safetensors", family, size, seed, dtype
        )
    if size == "small":  # full-size Flux files (24 GB each) only on request: fixtures_flux.write_flux
        from .fixtures_flux import write_flux_small

        written.update(write_flux_small(root / "unet", seed))
    written["clip_l"] = write_clip(root / "clip" / "clip_l.safetensors", "l", size, seed, dtype)
    if "sdxl" in families:
        written["clip_g"] = write_clip(root / "clip" / "clip_g.safetensors", "g", size, seed, dtype)
    if size == "small":  # a full T5-XXL is 9.5 GB: fixtures_t5.write_t5 writes one when asked
        from .fixtures_t5 import write_t5

        written["t5xxl"] = write_t5(root / "clip" / "t5xxl.safetensors", size, seed, dtype)
    from luna_stack.devtools.fixtures_vae16 import write_vae16_files  # it imports this module

    written.update(write_vae16_files(root, size, seed, dtype))
    if size == "small":  # full-size SD3 files (4 to 16 GB) only on request: fixtures_sd3.write_sd3
        from .fixtures_sd3 import write_sd3_small

        written.update(write_sd3_small(root / "unet", seed, dtype))
    return written


def main_fixtures(
    out_dir: str | Path, size: Size = "small", families: Sequence[Family] = ("sd15", "sdxl")
) -> int:
    """`luna-stack fixtures`: write a models directory and list it; returns the exit status."""
    for name, path in write_models_dir(out_dir, size, families).items():
        print(f"{name:18s} {path}  ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def demo_models_table() -> str:
    """The README's table of what `luna-stack run --demo` (size small) writes, from the configs above."""
    clip_l, clip_g = clip_config("l", "small"), clip_config("g", "small")
    vae = vae_config("small")
    rows = [
        "| file | what | shapes |",
        "|---|---|---|",
    ]
    for family in ("sd15", "sdxl"):
        unet = unet_config(family, "small")
        y = f", `y` [B, {unet['projection_class_embeddings_input_dim']}]" if family == "sdxl" else ""
        encoders = "CLIP-L" if family == "sd15" else "CLIP-L + CLIP-G"
        levels = ", ".join(
            f"{c} + {d}-layer attention" if "CrossAttn" in t else str(c)
            for c, d, t in zip(
                unet["block_out_channels"],
                unet["transformer_layers_per_block"],
                unet["down_block_types"],
                strict=True,
            )
        )
        rows.append(
            f"| `checkpoints/{family}-small.safetensors` | {family} checkpoint: UNet, VAE, {encoders} | "
            f"UNet levels {levels}; `context` [B, 77, {unet['cross_attention_dim']}]{y}; "
            "latent [B, 4, H/8, W/8] |"
        )
        rows.append(
            f"| `unet/{family}-small-unet.safetensors`, `vae/{family}-small-vae.safetensors` | "
            "the checkpoint's UNet and VAE as standalone files | as above |"
        )
    rows.append(
        "| `clip/clip_l.safetensors`, `clip/clip_g.safetensors` | the text encoders (HF / OpenCLIP "
        f"layout) | CLIP-L {clip_l['hidden_size']} wide, {clip_l['num_hidden_layers']} layers; CLIP-G "
        f"{clip_g['hidden_size']} wide, {clip_g['num_hidden_layers']} layers, pooled "
        f"{clip_g['projection_dim']}; 77-token chunks, the real vocabulary |"
    )
    rows.append(
        f"| (every SD VAE) | AutoencoderKL | channels {vae['block_out_channels']}: IMAGE [B, H, W, 3] <-> "
        f"latent [B, {vae['latent_channels']}, H/8, W/8] |"
    )
    from luna_stack.devtools.fixtures_vae16 import demo_row  # it imports this module

    rows.append(demo_row())
    from .fixtures_sd3 import sd3_demo_row

    rows.append(sd3_demo_row())
    return "\n".join(rows)
