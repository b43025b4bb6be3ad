"""The CLIP service: POST /v1/clip/{encode,encode_dual,tokenize}, GET /v1/clip/models.

A request names a model and gives either text (tokenized here, ComfyUI's syntax) or per-encoder token
chunks with weights (what ComfyUI's own tokenizer produced). Concurrent requests for one model run as
one forward through the Batcher; per-request LoRA goes through the side path; results are cached in
Redis by content (model weights, tokens, weights, clip skip, LoRA file hashes). On CUDA each encoder's
forward replays a captured graph per row bucket (encoder_graphs.py), LoRA through its static bank.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter

from luna_stack.config import Settings
from luna_stack.jobs.redis import connect
from luna_stack.lora import LoraCache, Stack, row_groups
from luna_stack.lora.request import parse_stack
from luna_stack.server.batcher import Batcher
from luna_stack.server.ipc import Sink
from luna_stack.server.resident import ResidentModels
from luna_stack.server.service import ModelService, Params, Tensors
from luna_stack.wire.errors import BadRequest, NotFound
from luna_stack.wire.tensors import dtype_name

from .bpe import shared_bpe
from .cache import ConditioningCache, cache_key
from .conditioning import EncodeJob, encode_jobs
from .embeddings import EmbeddingStore
from .encoder_graphs import build_runner, default_layers, graphed_forward
from .encoders import ClipEncoder
from .models import FOLDERS, ClipModel, load_clip_model
from .settings import ClipSettings
from .tokenize import Chunk, chunks_from_ids, chunks_to_json, tokenize

OPS = ("encode", "encode_dual", "tokenize")
SIZE_KEYS = {
    "width": 1024,
    "height": 1024,
    "crop_w": 0,
    "crop_h": 0,
    "target_width": 1024,
    "target_height": 1024,
}
_COMPONENT = {"l": "clip_l", "g": "clip_g"}
_INLINE_TOKENIZE = 1000  # prompts up to this many characters are tokenized on the event loop (no thread hop)


@dataclass(frozen=True)
class LoraStack:
    """A request's CLIP LoRA stack: compared by (file content hash, strength), adapters per encoder."""

    key: tuple[tuple[str, float], ...]
    per_encoder: dict[str, Stack] = field(compare=False, hash=False, default_factory=dict)


class ClipService(ModelService):
    kind = "clip"
    default_port = 8101

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.cfg = settings.of(ClipSettings)
        self.resident = ResidentModels(
            "clip", self.roots, FOLDERS, self.executor, self._load, load_on_demand=self.cfg.load_on_demand
        )
        self.embeddings = EmbeddingStore(self.roots)
        self.lora_cache = LoraCache(self.cfg.lora_cache_mb << 20, self.device, self.dtype)
        self.cache: ConditioningCache | None = None
        self.graph_cfg = self.cfg.graph
        self.graphs_on = self.graph_cfg.active_on(self.device)
        self.cache_lookups = Counter(
            "luna_clip_cache_lookups_total",
            "Conditioning cache lookups by result",
            ["result"],
            registry=self.metrics.registry,
        )
        self.batcher: Batcher[EncodeJob, tuple[torch.Tensor, torch.Tensor]] = Batcher(
            "clip",
            self._run_batch,
            self.executor,
            max_rows=self.cfg.max_batch,
            max_delay_ms=self.cfg.max_delay_ms,
            metrics=self.metrics,
        )

    # -- models ---------------------------------------------------------------------------------------
    def _load(self, name: str) -> ClipModel:
        model = load_clip_model(name, self.roots, device=self.device, dtype=self.dtype)
        if self.graphs_on:
            for key, encoder in model.encoders.items():
                runner = build_runner(encoder, name, self.graph_cfg, self.metrics.graph_forwards)
                model.graphs[key] = runner
                if not self.graph_cfg.lazy:
                    runner.warm_up([default_layers(encoder, model.family)])
        return model

    def models(self) -> list[dict[str, Any]]:
        return [
            {**m.describe(), "dtype": dtype_name(self.dtype), "device": str(self.device)}
            for m in self.resident
        ]

    async def startup(self) -> None:
        if self.settings.core.redis_url:
            redis = connect(self.settings.core.redis_url)
            self.lora_cache.redis = redis  # adapter metadata, LRU and hit counts for every replica
            if self.cfg.cache:
                self.cache = ConditioningCache(redis, self.cfg.cache_ttl_s)
        for name in self.cfg.preload:
            await self.resident.get(name, preload=True)

    async def shutdown(self) -> None:
        await self.batcher.close()
        if self.lora_cache.redis is not None:
            await self.lora_cache.redis.aclose()
        await super().shutdown()

    # -- request parsing --------------------------------------------------------------------------------
    def _tokenize_text(self, model: ClipModel, part: Params) -> tuple[dict[str, list[Chunk]], list[str]]:
        warnings: list[str] = []
        texts = {spec.key: part.get(f"text_{spec.key}", part.get("text")) for spec in model.specs}
        for key, text in texts.items():
            if not isinstance(text, str):
                raise BadRequest(f"give params.text (or text_{key}) as a string, or params.tokens")
        bpe = shared_bpe()
        chunks = {
            spec.key: tokenize(texts[spec.key], spec, bpe, self.embeddings, warnings, self.cfg.max_chunks)
            for spec in model.specs
        }
        if "text_g" in part or "text_l" in part:
            # CLIPTextEncodeSDXL pads the shorter side with empty-prompt chunks (plain CLIPTextEncode
            # leaves them unequal; the encoder then cuts to the shorter).
            longest = max(map(len, chunks.values()))
            for spec in model.specs:
                (empty,) = tokenize("", spec, bpe, None, warnings, 1)
                chunks[spec.key] += [list(empty) for _ in range(longest - len(chunks[spec.key]))]
        return chunks, list(dict.fromkeys(warnings))

    async def _chunks(self, model: ClipModel, part: Params) -> tuple[dict[str, list[Chunk]], list[str]]:
        tokens = part.get("tokens")
        if tokens is None:
            texts = [v for k, v in part.items() if k.startswith("text") and isinstance(v, str)]
            if sum(map(len, texts)) <= _INLINE_TOKENIZE:  # a thread hop costs more than a short prompt
                return self._tokenize_text(model, part)
            return await asyncio.to_thread(self._tokenize_text, model, part)
        if not isinstance(tokens, dict):
            raise BadRequest(
                'params.tokens must be an object like {"l": [[[id, weight], ...], ...], "g": ...}'
            )
        missing = [spec.key for spec in model.specs if spec.key not in tokens]
        if missing:
            raise BadRequest(f"params.tokens lacks {', '.join(missing)} for a {model.family} model")
        return {s.key: chunks_from_ids(tokens[s.key], s, self.cfg.max_chunks) for s in model.specs}, []

    @staticmethod
    def _clip_skip(params: Params) -> int | None:
        value = params.get("clip_skip")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value >= 0:
            raise BadRequest(
                f"clip_skip must be a negative integer, got {value!r}",
                hint="-1 = last layer, -2 = penultimate (ComfyUI's CLIPSetLastLayer)",
            )
        return value

    async def _lora_key(self, files: list[tuple[Path, float]]) -> tuple[tuple[str, float], ...]:
        """The stack as (file content hash, strength): what the output depends on, for the cache key."""
        return tuple([(await asyncio.to_thread(self.lora_cache.digest, path), s) for path, s in files])

    async def _lora_stack(
        self, model: ClipModel, files: list[tuple[Path, float]], key: tuple[tuple[str, float], ...]
    ) -> LoraStack:
        if not files:
            return LoraStack(())
        per_encoder: dict[str, Stack] = {}
        for enc_key, enc in model.encoders.items():
            adapters = [
                await self.lora_cache.aresolve(path, enc.model, _COMPONENT[enc_key], self.executor.run)
                for path, _ in files
            ]
            per_encoder[enc_key] = tuple(
                (a, s) for a, (_, s) in zip(adapters, files, strict=True) if a.factors
            )
        return LoraStack(key, per_encoder)

    # -- operations -------------------------------------------------------------------------------------
    async def run_op(
        self, op: str, tensors: Tensors, params: Params, client: str, sink: Sink
    ) -> tuple[Tensors, Params]:
        # Outputs stay host tensors (the conditioning cache keeps them); the app places them for IPC.
        if op not in OPS:
            raise NotFound(f"unknown CLIP operation {op!r}", hint=f"one of {', '.join(OPS)}")
        model = await self.resident.get(params.get("model"))
        if op == "tokenize":
            chunks, warnings = await self._chunks(model, params)
            return {}, {
                "model": model.name,
                "tokens": {k: chunks_to_json(v) for k, v in chunks.items()},
                "warnings": warnings,
            }
        clip_skip = self._clip_skip(params)
        lora_files = parse_stack(params.get("lora"), self.roots)
        out_params: Params = {"model": model.name, "family": model.family, **self._size_params(params)}
        if op == "encode":
            cond, pooled, info = await self._encode(model, params, clip_skip, lora_files, client)
            return {"cond": cond, "pooled": pooled}, {**out_params, **info}
        sides = {}
        for side in ("positive", "negative"):
            if not isinstance(params.get(side), dict):
                raise BadRequest(f"encode_dual needs params.{side} as an object with text or tokens")
        results = await asyncio.gather(
            *(
                self._encode(model, params[side], clip_skip, lora_files, client)
                for side in ("positive", "negative")
            )
        )
        out: Tensors = {}
        for side, (cond, pooled, info) in zip(("positive", "negative"), results, strict=True):
            out[f"{side}_cond"], out[f"{side}_pooled"] = cond, pooled
            sides[side] = info
        return out, {**out_params, **sides}

    @staticmethod
    def _size_params(params: Params) -> Params:
        """CLIPTextEncodeSDXL's size conditioning, passed through (its defaults for keys not given)."""
        if not any(k in params for k in SIZE_KEYS):
            return {}
        sizes = {k: params.get(k, default) for k, default in SIZE_KEYS.items()}
        for k, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(f"params.{k} must be a non-negative integer")
        return sizes

    async def _encode(
        self,
        model: ClipModel,
        part: Params,
        clip_skip: int | None,
        lora_files: list[tuple[Path, float]],
        client: str,
    ) -> tuple[torch.Tensor, torch.Tensor, Params]:
        chunks, warnings = await self._chunks(model, part)
        lora_key = await self._lora_key(lora_files)
        info: Params = {"chunks": max(len(c) for c in chunks.values()), "warnings": warnings, "cache": "off"}
        key = None
        if self.cache is not None and part.get("cache", True):
            key = cache_key(model.content_id, dtype_name(self.dtype), chunks, clip_skip, lora_key)
            hit = await self.cache.get(key)
            self.cache_lookups.labels(result="hit" if hit is not None else "miss").inc()
            if hit is not None:
                return hit[0], hit[1], {**info, "cache": "hit"}
            info["cache"] = "miss"
        job = EncodeJob(chunks, clip_skip, await self._lora_stack(model, lora_files, lora_key))
        cond, pooled = await self.batcher.submit(model.name, job, rows=info["chunks"], client=client)
        if key is not None and self.cache is not None:
            await self.cache.put(key, cond, pooled)
        return cond, pooled, info

    # -- compute thread ---------------------------------------------------------------------------------
    def _run_batch(self, key: Hashable, jobs: Sequence[EncodeJob]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model = self.resident.loaded(str(key))

        def lora_plan(encoder: ClipEncoder, row_stacks: Sequence[Hashable]):
            rows = [(1, s.per_encoder.get(encoder.kind, ())) for s in row_stacks]  # type: ignore[attr-defined]
            return model.slots[encoder.kind].plan(row_groups(rows))

        forward = graphed_forward(model.graphs, model.slots) if model.graphs else None
        results = encode_jobs(model.encoders, model.family, jobs, lora_plan, forward)
        return [(cond.cpu(), pooled.cpu()) for cond, pooled in results]

    # -- status ---------------------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return self.batcher.depth

    def status(self) -> dict[str, Any]:
        lora = self.lora_cache.stats()
        runners = [r for m in self.resident for r in m.graphs.values()]
        return {
            "batching": {
                "batches": self.batcher.batches,
                "rows": self.batcher.rows_total,
                "largest_batch": self.batcher.largest_batch,
                "max_batch": self.batcher.max_rows,
            },
            "conditioning_cache": vars(self.cache.stats) if self.cache is not None else None,
            "lora_cache": vars(lora),
            "graphs": self.graph_cfg.status(self.device, runners),
        }


def build(settings: Settings) -> ClipService:
    return ClipService(settings)
