"""Prompt -> per-encoder chunks of (token, weight), laid out as ComfyUI's SDTokenizer does.

A chunk is `[BOS] + up to 75 tokens + [EOS]`, padded to 77 (pad = EOS for CLIP-L, 0 for CLIP-G).
Tokens come in groups: each weighted segment of the prompt (cut at `embedding:` words) is one group,
and an embedding is one group of its vectors. A group that does not fit in the current chunk moves to
the next one whole, unless it has 8 tokens or more: then it is split at the chunk boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from luna_stack.wire.errors import BadRequest

from .bpe import BOS, EOS, VOCAB_SIZE, ClipBPE
from .embeddings import EmbeddingStore
from .prompt import EMBEDDING_PREFIX, parse_weights, split_embedding_words

Token = int | torch.Tensor  # a vocabulary id, or one textual-inversion vector
Chunk = list[tuple[Token, float]]

_MAX_WORD_LENGTH = 8  # groups this long may be split across chunks


@dataclass(frozen=True)
class EncoderSpec:
    key: str  # "l" / "g": the key of ComfyUI's token dict
    embedding_key: str  # tensor name in textual-inversion files
    pad: int
    length: int = 77


CLIP_L = EncoderSpec("l", "clip_l", pad=EOS)
CLIP_G = EncoderSpec("g", "clip_g", pad=0)


def empty_ids(spec: EncoderSpec, length: int | None = None) -> list[int]:
    """The empty prompt as ComfyUI encodes it for weighting: BOS, EOS, then pad."""
    n = spec.length if length is None else length
    return [BOS, EOS] + [spec.pad] * (n - 2)


def tokenize(
    text: str,
    spec: EncoderSpec,
    bpe: ClipBPE,
    embeddings: EmbeddingStore | None,
    warnings: list[str],
    max_chunks: int,
) -> list[Chunk]:
    """ComfyUI's tokenize_with_weights for one encoder; problems that ComfyUI ignores go to `warnings`."""
    groups: list[Chunk] = []
    for segment, weight in parse_weights(text):
        if not math.isfinite(weight):
            raise BadRequest(f"prompt weight {weight} is not a finite number")
        for word in split_embedding_words(segment):
            if word.startswith(EMBEDDING_PREFIX) and embeddings is not None:
                vectors, word = embedding_vectors(
                    word[len(EMBEDDING_PREFIX) :].strip("\n"), spec, embeddings, warnings
                )
                if vectors is not None:
                    groups.append([(v, weight) for v in vectors])
                if not word:
                    continue
            groups.append([(t, weight) for t in bpe.encode(word)])
    chunks = chunk_groups(groups, spec)
    if len(chunks) > max_chunks:
        raise BadRequest(
            f"prompt is {len(chunks)} chunks of 75 tokens; this service accepts at most {max_chunks}",
            hint="shorten the prompt or raise clip.max_chunks",
            details={"chunks": len(chunks), "max_chunks": max_chunks},
        )
    return chunks


def embedding_vectors(
    name: str, spec: EncoderSpec, store: EmbeddingStore, warnings: list[str]
) -> tuple[torch.Tensor | None, str]:
    """(vectors or None, leftover text) for the word after `embedding:`, as ComfyUI's _try_get_embedding."""
    parts = name.split()
    if not parts:
        warnings.append("an `embedding:` without a name was ignored")
        return None, ""
    first, *rest = parts
    leftover = " ".join(rest)
    found = store.load(first, spec.embedding_key)
    if found is None:
        stripped = first.strip(",")
        if len(stripped) < len(first):
            found = store.load(stripped, spec.embedding_key)
            leftover = f"{first[len(stripped) :]} {leftover}"
    if found is None:
        warnings.append(f"embedding:{first} not found (only .safetensors embeddings are loaded); ignored")
        return None, leftover
    return found.vectors, leftover


def chunk_groups(groups: list[Chunk], spec: EncoderSpec) -> list[Chunk]:
    room = spec.length - 1  # the last place of a chunk is for EOS
    chunks: list[Chunk] = []
    chunk: Chunk = [(BOS, 1.0)]
    chunks.append(chunk)
    for group in groups:
        splittable = len(group) >= _MAX_WORD_LENGTH
        while group:
            if len(chunk) + len(group) <= room:
                chunk.extend(group)
                break
            remaining = room - len(chunk)
            if splittable:
                chunk.extend(group[:remaining])
                chunk.append((EOS, 1.0))
                group = group[remaining:]
            else:
                chunk.append((EOS, 1.0))
                chunk.extend([(spec.pad, 1.0)] * remaining)
            chunk = [(BOS, 1.0)]
            chunks.append(chunk)
    chunk.append((EOS, 1.0))
    chunk.extend([(spec.pad, 1.0)] * (spec.length - len(chunk)))
    return chunks


def chunks_from_ids(raw: object, spec: EncoderSpec, max_chunks: int) -> list[Chunk]:
    """Validate client-supplied chunks: a list of chunks, each `length` [id, weight] pairs."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"tokens.{spec.key} must be a non-empty list of chunks")
    if len(raw) > max_chunks:
        raise BadRequest(f"tokens.{spec.key} has {len(raw)} chunks; at most {max_chunks} are accepted")
    chunks: list[Chunk] = []
    for c, chunk in enumerate(raw):
        if not isinstance(chunk, list) or len(chunk) != spec.length:
            raise BadRequest(f"tokens.{spec.key}[{c}] must be a list of {spec.length} [id, weight] pairs")
        chunks.append([token_pair(pair, f"tokens.{spec.key}[{c}]", VOCAB_SIZE) for pair in chunk])
    return chunks


def token_pair(pair: object, where: str, vocab_size: int) -> tuple[int, float]:
    """One client-supplied [id, weight] pair: an id of the vocabulary and a finite weight."""
    ok = isinstance(pair, list | tuple) and len(pair) == 2
    tok, weight = pair if ok else (None, None)  # type: ignore[misc]
    if not (
        ok
        and isinstance(tok, int)
        and not isinstance(tok, bool)
        and 0 <= tok < vocab_size
        and isinstance(weight, int | float)
        and math.isfinite(weight)
    ):
        raise BadRequest(
            f"{where} has an invalid pair {pair!r}",
            hint=f"each pair is [token id in 0..{vocab_size - 1}, finite weight]",
        )
    return tok, float(weight)


def chunks_to_json(chunks: list[Chunk]) -> list[list[list[float | int | str]]]:
    """Chunks as JSON; an embedding vector is shown as the string "embedding" (it has no id)."""
    return [[[t if isinstance(t, int) else "embedding", w] for t, w in chunk] for chunk in chunks]
