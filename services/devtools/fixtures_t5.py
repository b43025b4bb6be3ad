"""Random-weight T5-XXL text encoders (Flux / SD3) in the files ComfyUI users have.

- `write_t5`: a standalone clip/ or text_encoders/ file as t5xxl_fp16.safetensors is laid out: HF names
  `shared.weight`, `encoder.block.N.layer.M.*`, `encoder.final_layer_norm.weight` (no tied
  `encoder.embed_tokens`); fp16, bf16, fp32 or fp8 (t5xxl_fp8_e4m3fn.safetensors) storage.
- `write_t5_gguf`: the same weights as a ComfyUI-GGUF T5 encoder (llama.cpp names, Q8_0 blocks where a
  row allows, F32 otherwise).
- `write_sd3_text`: the text-encoder section of an SD3.5 all-in-one checkpoint,
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`, every encoder in HF layout.
Small: the real 32128-token vocabulary, 128 wide (wide enough for the small CLIP-L ++ CLIP-G, 96), two
gated-GELU layers of 4 heads x 16; full: T5 v1.1 XXL.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fixtures import Size, _clip_part, _metadata, _on_meta, _Part, _write

_T5 = {
    "full": {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64},
    "small": {"d_model": 128, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
}
_T5_SEED = 7919  # T5's own seed stream beside fixtures.py's per-component ones
_FP8 = torch.float8_e4m3fn


def t5_config(size: Size) -> dict[str, Any]:
    """transformers T5Config kwargs of T5 v1.1 XXL's encoder (or its small stand-in)."""
    return {
        **_T5[size],
        "vocab_size": 32128,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "dropout_rate": 0.0,
    }


def _init_norm(norm: nn.Module) -> None:
    # T5LayerNorm has no reset_parameters; weights around 1 (not exactly) so a skipped norm shows.
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)


def _t5_model(size: Size) -> nn.Module:
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    model = T5EncoderModel(T5Config(**t5_config(size)))
    del model.encoder.embed_tokens  # tied to `shared`; ComfyUI's files hold `shared.weight` only
    for module in model.modules():
        if isinstance(module, T5LayerNorm):
            module.reset_parameters = partial(_init_norm, module)
    return model


def _t5_part(size: Size, seed: int, prefix: str) -> _Part:
    return _Part(
        build=_on_meta(lambda: _t5_model(size)), rename=dict, prefix=prefix, seed=seed * _T5_SEED + 1
    )


def write_t5(
    path: str | Path, size: Size = "small", seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """clip/t5xxl_*.safetensors. fp8: written as fp16 then stored as float8_e4m3fn, norms included (as
    the fp8 files ComfyUI users download: everything fp8 but what they keep as it is)."""
    path = Path(path)
    meta = _metadata("t5xxl", "flux", size, seed)
    if dtype != _FP8:
        return _write(path, [_t5_part(size, seed, "")], dtype, meta)
    from safetensors.torch import load_file, save_file

    _write(path, [_t5_part(size, seed, "")], torch.float16, meta)
    sd = load_file(path)
    save_file({k: v.to(_FP8) for k, v in sd.items()}, str(path), metadata=meta)
    return path


def write_sd3_text(
    path: str | Path,
    size: Size = "small",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    with_t5: bool = True,
) -> Path:
    """The text encoders of an SD3.5 single-file checkpoint (no MMDiT / VAE), under their prefixes; CLIP-L
    and CLIP-G hold the same weights as write_clip(seed) writes."""
    parts = [
        _clip_part("l", size, seed, "text_encoders.clip_l.transformer.", "hf"),
        _clip_part("g", size, seed, "text_encoders.clip_g.transformer.", "hf"),
    ]
    if with_t5:
        parts.append(_t5_part(size, seed, "text_encoders.t5xxl.transformer."))
    return _write(Path(path), parts, dtype, _metadata("sd3_text", "sd3", size, seed))


def _gguf_name(hf: str) -> str:
    """HF name -> llama.cpp name, the inverse of ComfyUI-GGUF's clip_sd_map."""
    from luna_stack.clip.t5_encoder import _GGUF_T5_NAMES

    for gguf_name, hf_name in reversed(_GGUF_T5_NAMES):
        hf = hf.replace(hf_name, gguf_name)
    return hf


def write_t5_gguf(path: str | Path, size: Size = "small", seed: int = 0, qtype: str = "Q8_0") -> Path:
    """A T5 encoder GGUF as city96's converter lays it out (arch `t5encoder`)."""
    import gguf
    from safetensors.torch import load_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_t5(path.with_name(path.name + ".safetensors.tmp"), size, seed, torch.float32)
    target = gguf.GGMLQuantizationType[qtype]
    block, _ = gguf.GGML_QUANT_SIZES[target]
    writer = gguf.GGUFWriter(str(path), arch="t5encoder")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in load_file(tmp).items():
        data = tensor.numpy()
        chosen = target if data.ndim == 2 and data.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(_gguf_name(key), gguf.quants.quantize(data, chosen), raw_dtype=chosen)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.unlink()
    return path
