"""Prompt -> the T5-XXL token sequence of Flux and SD3, laid out as ComfyUI's T5XXLTokenizer does.

ComfyUI runs its SDTokenizer with T5's settings (comfy/text_encoders/flux.py, sd3_clip.py): no start
token, end token `</s>` (1), pad 0, no 77-token chunks (max_length is effectively unbounded), so a prompt
is ONE variable-length sequence: the weighted groups of every segment in prompt order, `</s>`, then pad
up to a minimum length (Flux 256, SD3 77). Weights and `embedding:` words follow the CLIP rules
(prompt.py); an embedding's `t5xxl` vectors go into the sequence, others are dropped by the encoder.

The vocabulary is Google's T5 v1.1 SentencePiece model as a `tokenizers` file (data/README.md), loaded
from the package: nothing is fetched.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
from importlib import resources

from tokenizers import Tokenizer

from luna_stack.wire.errors import BadRequest, LimitExceeded

from .embeddings import EmbeddingStore
from .prompt import EMBEDDING_PREFIX, parse_weights, split_embedding_words
from .tokenize import Chunk, EncoderSpec, embedding_vectors, token_pair

END = 1  # </s>
PAD = 0  # <pad>
VOCAB_SIZE = 32128  # rows of T5 v1.1's embedding (the tokenizer itself uses 32100 of them)
FLUX_MIN_LENGTH = 256
SD3_MIN_LENGTH = 77
# `length` has no meaning for T5 (no fixed chunk); the spec names the token-dict and embedding keys.
T5XXL = EncoderSpec("t5xxl", "t5xxl", pad=PAD, length=0)

_TOKENIZER_FILE = "t5_tokenizer.json.gz"
_TOKENIZER_SHA256 = "5c5a8d97cd93ee33328970613d4b7f0aca5aeb859e6a49464aa8cb19f61b9691"


def read_tokenizer() -> Tokenizer:
    """The T5 tokenizer from the package data, verified against the sha256 of the committed file."""
    raw = resources.files("luna_stack.clip").joinpath("data", _TOKENIZER_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _TOKENIZER_SHA256:
        raise RuntimeError(
            f"{_TOKENIZER_FILE} has sha256 {digest}, expected {_TOKENIZER_SHA256}: the file is damaged"
        )
    return Tokenizer.from_str(gzip.decompress(raw).decode("utf-8"))


@functools.cache
def shared_t5_tokenizer() -> Tokenizer:
    return read_tokenizer()


def encode_word(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of one piece of text without the `</s>` the tokenizer's template appends (ComfyUI cuts it)."""
    return tokenizer.encode(text).ids[:-1]


def tokenize_t5(
    text: str,
    min_length: int,
    tokenizer: Tokenizer,
    embeddings: EmbeddingStore | None,
    warnings: list[str],
    max_tokens: int,
) -> Chunk:
    """ComfyUI's T5XXLTokenizer.tokenize_with_weights (its single chunk); longer than `max_tokens` is 413."""
    tokens: Chunk = []
    for segment, weight in parse_weights(text):
        if not math.isfinite(weight):
            raise BadRequest(f"prompt weight {weight} is not a finite number")
        for word in split_embedding_words(segment):
            if word.startswith(EMBEDDING_PREFIX) and embeddings is not None:
                name = word[len(EMBEDDING_PREFIX) :].strip("\n")
                vectors, word = embedding_vectors(name, T5XXL, embeddings, warnings)
                if vectors is not None:
                    tokens.extend((v, weight) for v in vectors)
                if not word:
                    continue
            tokens.extend((t, weight) for t in encode_word(tokenizer, word))
    tokens.append((END, 1.0))
    check_length(len(tokens), max_tokens)
    tokens.extend([(PAD, 1.0)] * (min_length - len(tokens)))
    return tokens


def check_length(count: int, max_tokens: int) -> None:
    if count > max_tokens:
        raise LimitExceeded(
            f"the T5 prompt is {count} tokens; clip.max_t5_tokens={max_tokens}",
            hint="shorten the prompt or raise LUNA_CLIP_MAX_T5_TOKENS",
            details={"tokens": count, "max_t5_tokens": max_tokens},
        )


def t5_tokens_from_ids(raw: object, max_tokens: int) -> Chunk:
    """Validate a client-supplied T5 sequence (ComfyUI's `t5xxl` list): [[id, weight], ...] or that list
    wrapped once (ComfyUI's token dict keeps the sequence as the only chunk)."""
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], list) and raw[0]:  # noqa: SIM102
        if isinstance(raw[0][0], list | tuple):  # [[[id, w], ...]], not [[id, w]]
            raw = raw[0]
    if not isinstance(raw, list) or not raw:
        raise BadRequest("tokens.t5xxl must be a non-empty list of [id, weight] pairs")
    check_length(len(raw), max_tokens)
    return [token_pair(pair, "tokens.t5xxl", VOCAB_SIZE) for pair in raw]
