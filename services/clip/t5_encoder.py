"""The T5-XXL encoder of Flux and SD3 (transformers' T5EncoderModel), run with ComfyUI's numerics.

Precision: ComfyUI computes T5 in float32 whatever the file's dtype — its SDClipModel feeds float32
embeddings and comfy.ops' manual_cast casts every weight to the input's dtype at each layer — which is
also why T5 v1.1's fp16 overflow never bites there (no clamping needed). We do the same: the Linear
weights stay resident in the file's dtype (fp16 / bf16 / fp8) and are upcast layer by layer through
diffusers' layerwise casting; norms, the relative attention bias and the embedding are kept float32.
An fp8 embedding goes through nan_to_num as in ComfyUI's T5.forward. The attention is transformers'
(unscaled scores, as T5 defines it); ComfyUI scales k by sqrt(d_kv) and lets SDPA divide it back out,
so the two agree to float32 rounding, not bitwise.

GGUF files in city96's ComfyUI-GGUF convention (llama.cpp names `enc.blk.N.attn_q.weight`,
`token_embd.weight`, ...; its loader's clip_sd_map) load too: quantized weights stay resident as their
GGUF blocks and dequantize to float32 at each use (weights/precision.py's parametrization); the embedding is
dequantized once, as ComfyUI-GGUF does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from diffusers.hooks.layerwise_casting import apply_layerwise_casting, apply_layerwise_casting_hook
from transformers import T5Config, T5EncoderModel

from luna_stack.weights.checkpoint import t5_config_from_state_dict
from luna_stack.weights.gguf_file import read_gguf
from luna_stack.weights.precision import QuantizedWeight, install_gguf_weights
from luna_stack.wire.errors import ModelLoadError

from .encoders import ForwardOutput, to_device
from .t5_tokenize import PAD
from .tokenize import Chunk

COMPUTE_DTYPE = torch.float32
_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Modules kept in the compute dtype: everything but the Linear layers of the blocks.
_KEEP_FLOAT32 = ("shared", "embed_tokens", "relative_attention_bias", "layer_norm")
GGUF_RAW = torch.uint8  # storage_dtype of GGUF-quantized weights (raw blocks)
# llama.cpp -> HF names, applied in this order (ComfyUI-GGUF's clip_sd_map).
_GGUF_T5_NAMES = (
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
)
Weights = Mapping[str, torch.Tensor | QuantizedWeight]


def read_gguf_t5(path) -> dict[str, torch.Tensor | QuantizedWeight]:
    """A ComfyUI-GGUF T5 encoder file's tensors under HF names (quantized ones as QuantizedWeight)."""
    raw, _ = read_gguf(path)
    if "enc.blk.0.attn_q.weight" not in raw:
        raise ModelLoadError(
            f"{path.name} is not a T5 encoder GGUF",
            hint="GGUF text encoders are T5 files in ComfyUI-GGUF's names",
        )
    out = {}
    for key, value in raw.items():
        for old, new in _GGUF_T5_NAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


class T5Encoder:
    """One T5 encoder stack shared by every request (key "t5xxl")."""

    kind = "t5xxl"

    def __init__(self, model: T5EncoderModel, storage_dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False)
        self.storage_dtype = storage_dtype
        config = model.config
        self.num_layers: int = config.num_layers
        self.width: int = config.d_model
        self.vocab_size: int = config.vocab_size

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Weights,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> T5Encoder:
        """Build from HF-layout weights (`shared.weight`, `encoder.block.N.*`, `encoder.final_layer_norm.*`).

        Linear weights are stored in the file's dtype when it is 16-bit or fp8, else in `dtype`."""
        config = T5Config(**t5_config_from_state_dict(state_dict))
        with torch.device("meta"):
            model = T5EncoderModel(config)
        model.encoder.embed_tokens = model.shared  # tied in transformers; files hold `shared.weight` only
        own = set(model.state_dict()) - {"encoder.embed_tokens.weight"}
        missing = own - set(state_dict)
        if missing:
            raise ModelLoadError(f"T5 weights lack {len(missing)} tensors, e.g. {min(missing)}")
        if any(isinstance(v, QuantizedWeight) for v in state_dict.values()):
            return cls._from_gguf(model, state_dict, own, torch.device(device))
        file_dtype = state_dict["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype
        storage = file_dtype if file_dtype in _STORAGE_DTYPES else dtype
        weights = {}
        for key in own:
            target = COMPUTE_DTYPE if any(part in key for part in _KEEP_FLOAT32) else storage
            weights[key] = state_dict[key].to(device=device, dtype=target, copy=True)
        if state_dict["shared.weight"].dtype in _FP8:
            weights["shared.weight"] = torch.nan_to_num(weights["shared.weight"])
        model.load_state_dict(weights, strict=False, assign=True)
        model.encoder.embed_tokens = model.shared
        if storage != COMPUTE_DTYPE:
            skip = (*_KEEP_FLOAT32, "DenseReluDense")
            apply_layerwise_casting(model, storage, COMPUTE_DTYPE, skip_modules_pattern=skip)
            for block in model.encoder.block:
                # transformers casts the feed-forward's hidden states to `wo`'s dtype before `wo`: the
                # whole feed-forward upcasts at once, so that dtype is the compute dtype there.
                apply_layerwise_casting_hook(block.layer[-1].DenseReluDense, storage, COMPUTE_DTYPE, False)
        return cls(model, storage)

    @classmethod
    def _from_gguf(
        cls, model: T5EncoderModel, state_dict: Weights, own: set[str], device: torch.device
    ) -> T5Encoder:
        weights = {k: state_dict[k] for k in own}
        shared = weights["shared.weight"]
        if isinstance(shared, QuantizedWeight):  # looked up by row: expanded once
            weights["shared.weight"] = shared.dequantize(COMPUTE_DTYPE)
        weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
        install_gguf_weights(model, dict(weights), COMPUTE_DTYPE, device)
        model.encoder.embed_tokens = model.shared
        return cls(model, GGUF_RAW)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def embed(self, rows: Iterable[Chunk]) -> torch.Tensor:
        """Input embeddings [rows, length, width] in float32; all rows have one length.

        As ComfyUI: an embedding vector of the wrong width is dropped and the row padded at the end."""
        ids: list[list[int]] = []
        vectors: list[tuple[int, int, torch.Tensor]] = []
        for row, chunk in enumerate(rows):
            tokens = [t for t, _ in chunk if isinstance(t, int) or t.shape[-1] == self.width]
            tokens += [PAD] * (len(chunk) - len(tokens))
            ids.append([t if isinstance(t, int) else 0 for t in tokens])
            vectors += [(row, i, t) for i, t in enumerate(tokens) if not isinstance(t, int)]
        embeds = self.model.shared(to_device(torch.tensor(ids), self.device))
        for row, i, t in vectors:
            embeds[row, i] = t.to(device=embeds.device, dtype=embeds.dtype)
        return embeds

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, keep: Iterable[int]) -> ForwardOutput:
        """Run the blocks; `keep` names the (0-based) blocks whose outputs are returned (before the final
        layer norm). No attention mask, as ComfyUI's Flux/SD3 T5: padding takes part in attention."""
        keep = set(keep)
        h = embeds.to(COMPUTE_DTYPE)
        bias = None
        hidden: dict[int, torch.Tensor] = {}
        stack = self.model.encoder
        for i, block in enumerate(stack.block):
            h, bias, _ = block(h, None, bias, None, None, None, cache=None)
            if i in keep:
                hidden[i] = h
        return ForwardOutput(hidden, stack.final_layer_norm(h))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.final_layer_norm(h)
