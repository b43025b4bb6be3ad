"""The CLIP family: POST /v1/clip/{encode,encode_dual,tokenize}.

A request names a model and gives either text (tokenized here, ComfyUI's syntax) or per-encoder token
chunks with weights (what ComfyUI's own tokenizer produced). Families: SD1.5 (CLIP-L), SDXL (CLIP-L +
CLIP-G), Flux (CLIP-L + T5-XXL) and SD3 (any of CLIP-L, CLIP-G, T5-XXL; t5_conditioning.py). Concurrent
requests for one model run as one forward through the server's batcher; per-request LoRA goes through
the side path; results are cached in Redis by content (model weights, tokens, weights, clip skip, LoRA
file hashes). On CUDA each encoder's forward replays a captured graph per row bucket
(encoder_graphs.py; by default captured while the service is idle), LoRA through its static bank.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from prometheus_client import Counter

from luna_stack.config import Settings
from luna_stack.gpu.graphs import capture_one
from luna_stack.lora import LoraCache, row_groups
from luna_stack.lora.request import parse_stack
from luna_stack.lora.stack import LoraStack, resolve_stack, stack_key
from luna_stack.server.family import (
    IdlePolicy,
    ModelFamily,
    OpRequest,
    OpSpec,
    Params,
    Reply,
    ServiceContext,
    TensorSpec,
)
from luna_stack.server.service import Service
from luna_stack.wire.contract import SIZE_DEFAULTS
from luna_stack.wire.errors import BadRequest, LimitExceeded
from luna_stack.wire.tensors import dtype_name

from .bpe import shared_bpe
from .cache import ConditioningCache, cache_key
from .conditioning import EncodeJob, encode_jobs
from .embeddings import EmbeddingStore
from .encoder_graphs import build_runner, default_layers, graphed_forward
from .encoders import ClipEncoder
from .models import FOLDERS, ClipModel, Family, load_clip_model
from .settings import ClipSettings
from .t5_conditioning import check_sd3, clip_layer_family, encode_t5_jobs
from .t5_encoder import COMPUTE_DTYPE as T5_COMPUTE_DTYPE
from .t5_tokenize import (
    FLUX_MIN_LENGTH,
    SD3_MIN_LENGTH,
    T5XXL,
    shared_t5_tokenizer,
    t5_tokens_from_ids,
    tokenize_t5,
)
from .tokenize import Chunk, chunks_from_ids, chunks_to_json, tokenize

_COMPONENT = {"l": "clip_l", "g": "clip_g", "t5xxl": "t5xxl"}
_T5_MIN_LENGTH = {"flux": FLUX_MIN_LENGTH, "sd3": SD3_MIN_LENGTH}
_INLINE_TOKENIZE = 1000  # prompts up to this many characters are tokenized on the event loop (no thread hop)


_TEXT_OPS = (
    "params: model, text (or text_l/text_g/text_t5xxl) or tokens ({l, g, t5xxl}), family (sd3 for a "
    "Flux or SDXL pair), clip_skip, lora, cache"
)
_COND = TensorSpec("cond", "[1,T,D] conditioning (float32)")
_POOLED = TensorSpec("pooled", "[1,P] pooled output (float32)")
OPS = {
    "encode": OpSpec("encode", "prompt -> (cond, pooled). " + _TEXT_OPS, (), (_COND, _POOLED)),
    "encode_dual": OpSpec(
        "encode_dual",
        "positive and negative prompts in one request: params.positive / params.negative as for encode",
        (),
        tuple(
            TensorSpec(f"{side}_{s.name}", s.doc)
            for side in ("positive", "negative")
            for s in (_COND, _POOLED)
        ),
    ),
    "tokenize": OpSpec("tokenize", "prompt -> token chunks per encoder (params.tokens of the reply)"),
}


@dataclass(frozen=True)
class ClipWork:
    model: ClipModel
    job: EncodeJob
    family: Family

    @property
    def rows(self) -> int:
        return max(len(c) for c in self.job.chunks.values())


class ClipFamily(ModelFamily[ClipModel, ClipWork]):
    kind = "clip"
    folders = FOLDERS
    takes_lora = True
    ops: ClassVar[Mapping[str, OpSpec]] = OPS

    section = ClipSettings
    cfg: ClipSettings

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        self.embeddings = EmbeddingStore(ctx.roots)
        self.lora_cache = LoraCache(self.cfg.lora_cache_mb << 20, ctx.device, ctx.dtype)
        # T5 computes in float32 (t5_encoder.py): its adapters are kept in that dtype.
        self.t5_lora_cache = LoraCache(self.cfg.lora_cache_mb << 20, ctx.device, T5_COMPUTE_DTYPE)
        self.cache: ConditioningCache | None = None
        self.graph_cfg = self.cfg.graph
        self.graphs_on = self.graph_cfg.active_on(ctx.device)
        self.cache_lookups = Counter(
            "luna_clip_cache_lookups_total",
            "Conditioning cache lookups by result",
            ["result"],
            registry=ctx.metrics.registry,
        )

    # -- models ---------------------------------------------------------------------------------------
    def load(self, name: str) -> ClipModel:
        model = load_clip_model(name, self.ctx.roots, device=self.ctx.device, dtype=self.ctx.dtype)
        if self.graphs_on:
            for key, encoder in model.clips.items():  # T5 runs eager
                runner = build_runner(encoder, name, self.graph_cfg, self.ctx.metrics.graph_forwards)
                model.graphs[key] = runner
                if self.graph_cfg.capture == "start":  # before the model is ready
                    runner.warm_up([default_layers(encoder, clip_layer_family(model.family))], lora=False)
        return model

    @property
    def idle_policy(self) -> IdlePolicy:
        return IdlePolicy(self.graph_cfg.idle_ms, self.graph_cfg.release_idle_s)

    def background_work(self, models: Sequence[ClipModel]) -> bool:
        return capture_one(r for m in models for r in m.graphs.values())

    def describe_model(self, model: ClipModel) -> dict[str, Any]:
        return {**model.describe(), "dtype": dtype_name(self.ctx.dtype), "device": str(self.ctx.device)}

    async def startup(self) -> None:
        if self.ctx.redis is not None:
            self.lora_cache.redis = self.ctx.redis  # adapter metadata, LRU and hit counts for every replica
            self.t5_lora_cache.redis = self.ctx.redis
            if self.cfg.cache:
                self.cache = ConditioningCache(self.ctx.redis, self.cfg.cache_ttl_s)

    # -- request parsing --------------------------------------------------------------------------------
    def _tokenize_text(
        self, model: ClipModel, family: Family, part: Params
    ) -> tuple[dict[str, list[Chunk]], list[str]]:
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
        if self._uses_t5(model, family):
            text = part.get("text_t5xxl", part.get("text"))
            if not isinstance(text, str):
                raise BadRequest("give params.text (or text_t5xxl) as a string, or params.tokens")
            t5 = tokenize_t5(
                text,
                _T5_MIN_LENGTH[family],
                shared_t5_tokenizer(),
                self.embeddings,
                warnings,
                self.cfg.max_t5_tokens,
            )
            chunks[T5XXL.key] = [t5]
        if family in ("sdxl", "sd3") and ("text_g" in part or "text_l" in part):
            # CLIPTextEncodeSDXL / CLIPTextEncodeSD3 pad the shorter side with empty-prompt chunks (plain
            # CLIPTextEncode leaves them unequal; the encoder then cuts to the shorter).
            longest = max(map(len, chunks.values()))
            for spec in model.specs:
                (empty,) = tokenize("", spec, bpe, None, warnings, 1)
                chunks[spec.key] += [list(empty) for _ in range(longest - len(chunks[spec.key]))]
        return chunks, list(dict.fromkeys(warnings))

    @staticmethod
    def _uses_t5(model: ClipModel, family: Family) -> bool:
        return model.t5 is not None and family in _T5_MIN_LENGTH

    async def _chunks(
        self, model: ClipModel, family: Family, part: Params
    ) -> tuple[dict[str, list[Chunk]], list[str]]:
        tokens = part.get("tokens")
        if tokens is None:
            texts = [v for k, v in part.items() if k.startswith("text") and isinstance(v, str)]
            chars = sum(map(len, texts))
            if chars > self.cfg.max_prompt_chars:
                raise LimitExceeded(
                    f"the prompt has {chars} characters; clip.max_prompt_chars={self.cfg.max_prompt_chars}",
                    hint="shorten it or raise LUNA_CLIP_MAX_PROMPT_CHARS",
                )
            if chars <= _INLINE_TOKENIZE:  # a thread hop costs more than a short prompt
                return self._tokenize_text(model, family, part)
            return await asyncio.to_thread(self._tokenize_text, model, family, part)
        if not isinstance(tokens, dict):
            raise BadRequest(
                'params.tokens must be an object like {"l": [[[id, weight], ...], ...], "g": ...}'
            )
        uses_t5 = self._uses_t5(model, family)
        wanted = [spec.key for spec in model.specs] + ([T5XXL.key] if uses_t5 else [])
        missing = [key for key in wanted if key not in tokens]
        if missing:
            raise BadRequest(f"params.tokens lacks {', '.join(missing)} for a {family} model")
        if "t5xxl" in tokens and family not in _T5_MIN_LENGTH:  # SD3 without T5 ignores them, as ComfyUI
            raise BadRequest(f"params.tokens has t5xxl tokens, but {family} conditioning uses no T5")
        chunks = {s.key: chunks_from_ids(tokens[s.key], s, self.cfg.max_chunks) for s in model.specs}
        if uses_t5:
            chunks[T5XXL.key] = [t5_tokens_from_ids(tokens[T5XXL.key], self.cfg.max_t5_tokens)]
        return chunks, []

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

    # -- operations -------------------------------------------------------------------------------------
    async def serve(self, request: OpRequest[ClipModel]) -> Reply:
        # Outputs stay host tensors (the conditioning cache keeps them); the route places them for IPC.
        op, model, params = request.op, request.model, request.params
        family = model.pick_family(params.get("family"))
        if family == "sd3":
            check_sd3(model)
        if op == "tokenize":
            chunks, warnings = await self._chunks(model, family, params)
            tokens = {k: chunks_to_json(v) for k, v in chunks.items()}
            return Reply({}, {"model": model.name, "family": family, "tokens": tokens, "warnings": warnings})
        clip_skip = self._clip_skip(params)
        lora_files = parse_stack(params.get("lora"), self.ctx.roots, self.cfg.max_loras)
        out_params: Params = {"model": model.name, "family": family, **self._size_params(params)}
        if op == "encode":
            cond, pooled, info = await self._encode(request, family, params, clip_skip, lora_files)
            return Reply({"cond": cond, "pooled": pooled}, {**out_params, **info})
        for side in ("positive", "negative"):
            if not isinstance(params.get(side), dict):
                raise BadRequest(f"encode_dual needs params.{side} as an object with text or tokens")
        results = await asyncio.gather(
            *(
                self._encode(request, family, params[side], clip_skip, lora_files)
                for side in ("positive", "negative")
            )
        )
        out: dict[str, torch.Tensor] = {}
        sides = {}
        for side, (cond, pooled, info) in zip(("positive", "negative"), results, strict=True):
            out[f"{side}_cond"], out[f"{side}_pooled"] = cond, pooled
            sides[side] = info
        return Reply(out, {**out_params, **sides})

    @staticmethod
    def _size_params(params: Params) -> Params:
        """CLIPTextEncodeSDXL's size conditioning, passed through (its defaults for keys not given)."""
        if not any(k in params for k in SIZE_DEFAULTS):
            return {}
        sizes = {k: params.get(k, default) for k, default in SIZE_DEFAULTS.items()}
        for k, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(f"params.{k} must be a non-negative integer")
        return sizes

    async def _encode(
        self,
        request: OpRequest[ClipModel],
        family: Family,
        part: Params,
        clip_skip: int | None,
        lora_files: list[tuple[Path, float]],
    ) -> tuple[torch.Tensor, torch.Tensor, Params]:
        model = request.model
        chunks, warnings = await self._chunks(model, family, part)
        lora_key = await stack_key(lora_files, self.lora_cache)
        clip_chunks = [len(c) for k, c in chunks.items() if k != T5XXL.key]
        info: Params = {"chunks": max(clip_chunks, default=0), "warnings": warnings, "cache": "off"}
        if T5XXL.key in chunks:
            info["t5_tokens"] = len(chunks[T5XXL.key][0])
        key = None
        if self.cache is not None and part.get("cache", True):
            dtype = dtype_name(self.ctx.dtype)
            key = cache_key(model.content_id, dtype, chunks, clip_skip, lora_key, family)
            hit = await self.cache.get(key)
            self.cache_lookups.labels(result="hit" if hit is not None else "miss").inc()
            if hit is not None:
                return hit[0], hit[1], {**info, "cache": "hit"}
            info["cache"] = "miss"
        run = self.ctx.executor.run
        parts = {key: (enc.model, _COMPONENT[key]) for key, enc in model.clips.items()}
        stack = await resolve_stack(lora_files, self.lora_cache, parts, run, lora_key)
        if model.t5 is not None and lora_files:
            t5_part = {T5XXL.key: (model.t5.model, "t5xxl")}
            t5_stack = await resolve_stack(lora_files, self.t5_lora_cache, t5_part, run, lora_key)  # type: ignore[arg-type]
            stack = LoraStack(stack.key, {**stack.adapters, **t5_stack.adapters})
        job = EncodeJob(chunks, clip_skip, stack)
        cond, pooled = await request.compute(ClipWork(model, job, family))
        if key is not None and self.cache is not None:
            await self.cache.put(key, cond, pooled)
        return cond, pooled, info

    def batch_key(self, work: ClipWork) -> Hashable:
        # One family per batch (layer rules differ); T5 rows of different lengths share a batch but
        # never a forward (t5_conditioning.encode_t5).
        return work.model.name, work.family

    # -- compute thread ---------------------------------------------------------------------------------
    def run_batch(self, works: Sequence[ClipWork]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model, family = works[0].model, works[0].family

        def lora_plan(encoder: ClipEncoder, row_stacks: Sequence[LoraStack]):
            return model.slots[encoder.kind].plan(row_groups([(1, s.part(encoder.kind)) for s in row_stacks]))

        forward = graphed_forward(model.graphs, model.slots) if model.graphs else None
        jobs = [w.job for w in works]
        if family in _T5_MIN_LENGTH:
            results = encode_t5_jobs(model, family, jobs, lora_plan, forward)
        else:
            results = encode_jobs(model.clips, family, jobs, lora_plan, forward)
        return [(cond.cpu(), pooled.cpu()) for cond, pooled in results]

    # -- status ---------------------------------------------------------------------------------------------
    def status(self, models: Sequence[ClipModel]) -> dict[str, Any]:
        runners = [r for m in models for r in m.graphs.values()]
        return {
            "conditioning_cache": vars(self.cache.stats) if self.cache is not None else None,
            "lora_cache": vars(self.lora_cache.stats()),
            "graphs": self.graph_cfg.status(self.ctx.device, runners),
        }


def build(settings: Settings) -> Service:
    """The clip service: the server around this family (what `luna-stack serve clip` runs)."""
    return Service(settings, ClipFamily)
