"""CLIP's byte-level BPE, offline, from the merge list OpenAI published (services/clip/data).

The ids equal those of transformers' CLIPTokenizer built from openai/clip-vit-large-patch14's
vocab.json / merges.txt, which is what ComfyUI tokenizes with (comfy/sd1_tokenizer, for CLIP-L and
CLIP-G alike). Text cleanup follows that tokenizer: Unicode NFC, runs of whitespace to one space,
lowercase. OpenAI's original tokenizer also ran ftfy.fix_text and html.unescape; transformers does
neither when ftfy is absent (its usual state in ComfyUI installs), so neither do we.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import unicodedata
from importlib import resources

import regex

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
VOCAB_SIZE = 49408

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# The first line is a version header; CLIP uses the next 49152 - 256 - 2 merges.
_N_MERGES = 49152 - 256 - 2
_SPECIAL = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
_WORD = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_SPACES = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values onto printable characters (no spaces/controls)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def read_merges() -> list[tuple[str, str]]:
    """The merge list, verified against the sha256 of the committed file."""
    raw = resources.files("luna_stack.clip").joinpath("data", _VOCAB_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _VOCAB_SHA256:
        raise RuntimeError(
            f"{_VOCAB_FILE} has sha256 {digest}, expected {_VOCAB_SHA256}: the file is damaged"
        )
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


def clean_text(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).lower()


class ClipBPE:
    """Text -> CLIP token ids (without BOS/EOS), with a per-word cache."""

    def __init__(self) -> None:
        merges = read_merges()
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIAL)
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self._byte_map = bytes_to_unicode()
        self._word_ids = functools.lru_cache(maxsize=65536)(self._encode_word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _WORD.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        if word in _SPECIAL:
            return (_SPECIAL[word],)
        mapped = "".join(self._byte_map[b] for b in word.encode("utf-8"))
        return tuple(self.encoder[piece] for piece in self._merge(mapped))

    def _merge(self, word: str) -> list[str]:
        """Apply merges lowest rank first until none applies; the last symbol carries '</w>'."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(itertools.pairwise(parts))
            best = min(pairs, key=lambda p: self.ranks.get(p, _N_MERGES))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts


@functools.cache
def shared_bpe() -> ClipBPE:
    """One tokenizer per process: building the rank table takes ~0.2 s."""
    return ClipBPE()
