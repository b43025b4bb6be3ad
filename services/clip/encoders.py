"""CLIP text encoders as transformers modules, run the way ComfyUI runs them.

A chunk may hold textual-inversion vectors besides token ids, so the forward starts from input
embeddings; it runs transformers' own embedding, encoder layers and final layer norm, and keeps only
the hidden states a batch needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.masking_utils import create_causal_mask

from luna_stack.weights.checkpoint import clip_config_from_state_dict
from luna_stack.weights.ldm_layout import clip_hf_for_model
from luna_stack.wire.errors import ModelLoadError

from .bpe import EOS
from .tokenize import CLIP_G, CLIP_L, Chunk


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stalling the host: from pinned memory, asynchronously (a
    pageable copy would wait for every kernel queued before it, e.g. the other encoder's graph)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class ForwardOutput:
    hidden: dict[int, torch.Tensor]  # encoder layer index (0-based) -> its output, [rows, length, width]
    final: torch.Tensor  # final layer norm of the last layer


class ClipEncoder:
    """One CLIP text transformer (CLIP-L or CLIP-G) shared by every request."""

    def __init__(self, kind: str, model: CLIPTextModel | CLIPTextModelWithProjection):
        self.kind = kind
        self.spec = CLIP_G if kind == "g" else CLIP_L
        self.model = model.eval().requires_grad_(False)
        self.text: CLIPTextModel = getattr(model, "text_model", model)
        self.projection: torch.nn.Linear | None = getattr(model, "text_projection", None)
        config = self.text.config
        self.num_layers: int = config.num_hidden_layers
        self.width: int = config.hidden_size
        self.length: int = config.max_position_embeddings

    @classmethod
    def from_state_dict(
        cls,
        kind: str,
        state_dict: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ClipEncoder:
        """Build from canonical HF-layout weights (`text_model.*`, `text_projection.weight` for CLIP-G)."""
        config = CLIPTextConfig(**clip_config_from_state_dict(state_dict, f"clip_{kind}"))  # type: ignore[arg-type]
        # CLIP-L's projection is never used (SD1.5 pools unprojected, SDXL pools CLIP-G): not built.
        model_cls = CLIPTextModelWithProjection if kind == "g" else CLIPTextModel
        with torch.device("meta"):
            model = model_cls(config)
        own = set(model.state_dict())
        # Always fresh copies on the target device: a file-mapped tensor at an odd offset may take other
        # (differently rounded) kernel paths; the same weights must give the same output from any file.
        weights = {
            k: v.to(device=device, dtype=dtype, copy=True)
            for k, v in clip_hf_for_model(state_dict, model).items()
            if k in own
        }
        missing = own - set(weights)
        if missing:
            raise ModelLoadError(
                f"CLIP-{kind.upper()} weights lack {len(missing)} tensors, e.g. {min(missing)}"
            )
        model.load_state_dict(weights, assign=True)
        # The one non-persistent buffer is still on meta: rebuild it as transformers does.
        embeddings = getattr(model, "text_model", model).embeddings
        positions = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
        embeddings.register_buffer("position_ids", positions, persistent=False)
        return cls(kind, model)

    @property
    def device(self) -> torch.device:
        return self.text.embeddings.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embeddings.token_embedding.weight.dtype

    def embed(self, chunks: Iterable[Chunk]) -> tuple[torch.Tensor, list[int]]:
        """Input embeddings [rows, length, width] and each row's pooling position.

        As in ComfyUI: a textual-inversion vector of the wrong width is dropped and the row padded at the
        end; the pooled token is the first EOS, counting inserted vectors. All rows' ids go to the device
        in one copy and through one lookup.
        """
        ids: list[list[int]] = []
        vectors: list[tuple[int, int, torch.Tensor]] = []  # (row, position, textual-inversion vector)
        pool_at: list[int] = []
        for row, chunk in enumerate(chunks):
            tokens = [t for t, _ in chunk if isinstance(t, int) or t.shape[-1] == self.width]
            dropped = len(chunk) - len(tokens)
            tokens += [self.spec.pad] * dropped
            ids.append([t if isinstance(t, int) else 0 for t in tokens])
            vectors += [(row, i, t) for i, t in enumerate(tokens) if not isinstance(t, int)]
            eos = next((i for i, t in enumerate(tokens) if isinstance(t, int) and t == EOS), None)
            pool_at.append(eos if eos is not None else len(tokens) - 1 - dropped)
        embeds = self.text.embeddings.token_embedding(to_device(torch.tensor(ids), self.device))
        for row, i, t in vectors:
            embeds[row, i] = t.to(device=embeds.device, dtype=embeds.dtype)
        return embeds, pool_at

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, keep: Iterable[int]) -> ForwardOutput:
        """Run the transformer; `keep` names the (0-based) layers whose outputs are returned."""
        keep = set(keep)
        h = self.text.embeddings(inputs_embeds=embeds.to(self.dtype))
        mask = create_causal_mask(
            config=self.text.config, inputs_embeds=h, attention_mask=None, past_key_values=None
        )
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.text.encoder.layers):
            h = layer(h, mask, is_causal=True)
            if i in keep:
                hidden[i] = h
        return ForwardOutput(hidden, self.text.final_layer_norm(h))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            raise ModelLoadError(f"CLIP-{self.kind.upper()} has no text_projection weights")
        return self.projection(pooled)
