"""The offline BPE and ComfyUI's prompt syntax / chunk layout."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from luna_stack.clip.bpe import BOS, EOS, bytes_to_unicode, read_merges, shared_bpe
from luna_stack.clip.embeddings import EmbeddingStore
from luna_stack.clip.prompt import parse_weights
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, chunk_groups, tokenize
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, masterpiece!!! best-quality... (8k) [ugly]",
    "numbers 1234567890 3.14159 1,000,000 2nd 21st",
    "don't you've we'll it's I'm they're he'd",
    "naïve café résumé Ångström straße ÆØÅ",
    "日本語のテキスト 中文 한국어 русский текст ελληνικά",
    "emoji 🐱🎨✨ and symbols ©®™ → ≤≥ ∞",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "tabs\tand\nnewlines  and   many    spaces ",
    "e\u0301 composed vs é precomposed",
    "weird_under_scores and-hyphens/slashes\\back #hash @at $dollar %percent ^caret &amp;",
    "<|endoftext|> inside text <|startoftext|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """transformers' CLIPTokenizer from vocab.json / merges.txt derived here from the same gz data."""
    raw = gzip.decompress(
        resources.files("luna_stack.clip").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    )
    _header, *lines = raw.decode("utf-8").split("\n")
    merges = [line for line in lines[: 49152 - 256 - 2] if line]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder))


def test_vocab_layout():
    merges = read_merges()
    assert len(merges) == 48894
    assert merges[0] == ("i", "n")
    bpe = shared_bpe()
    assert len(bpe.encoder) == 49408
    assert bpe.encoder["<|startoftext|>"] == BOS and bpe.encoder["<|endoftext|>"] == EOS


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers(hf_tokenizer, prompt):
    expected = hf_tokenizer(prompt)["input_ids"]
    assert [BOS, *shared_bpe().encode(prompt), EOS] == expected


def test_known_ids():
    # ids of openai/clip-vit-large-patch14, as ComfyUI's sd1_tokenizer gives them
    assert shared_bpe().encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("(cat)", [("cat", pytest.approx(1.1))]),
        ("((cat))", [("cat", pytest.approx(1.21))]),
        ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
        ("((cat:0.5))", [("cat", pytest.approx(0.5 * 1.0))]),  # explicit weight replaces the inner factor
        ("((cat):0.5)", [("cat", pytest.approx(0.55))]),
        ("(a (b:2) c)", [("a ", pytest.approx(1.1)), ("b", 2.0), (" c", pytest.approx(1.1))]),
        ("[cat]", [("[cat]", 1.0)]),  # ComfyUI gives brackets no meaning
        (r"\(cat\)", [("(cat)", 1.0)]),
        (r"(a \(b\):1.3)", [("a (b)", 1.3)]),
        ("(cat:abc)", [("cat:abc", pytest.approx(1.1))]),
        ("a (cat", [("a ", 1.0), ("(cat", 1.0)]),  # unclosed: literal
        ("a cat)", [("a cat)", 1.0)]),  # stray close: literal
        ("time 12:30 (x)", [("time 12:30 ", 1.0), ("x", pytest.approx(1.1))]),
    ],
)
def test_parse_weights(text, expected):
    assert parse_weights(text) == expected


def test_parse_depth_limit():
    assert parse_weights("(" * 50 + "x" + ")" * 50)[0][1] == pytest.approx(1.1**50)
    with pytest.raises(BadRequest):
        parse_weights("(" * 1000 + "x" + ")" * 1000)


def _tok(text: str, spec=CLIP_L, store=None, warnings=None, max_chunks=64):
    return tokenize(text, spec, shared_bpe(), store, warnings if warnings is not None else [], max_chunks)


def test_empty_prompt_layout():
    (chunk_l,) = _tok("")
    assert chunk_l == [(BOS, 1.0), (EOS, 1.0)] + [(EOS, 1.0)] * 75
    (chunk_g,) = _tok("", CLIP_G)
    assert chunk_g == [(BOS, 1.0), (EOS, 1.0)] + [(0, 1.0)] * 75


def test_weights_reach_tokens():
    (chunk,) = _tok("a (cat:1.5) ((dog))")
    ids = shared_bpe().encode("a cat dog")
    assert [t for t, _ in chunk[1:4]] == ids
    assert [w for _, w in chunk[1:4]] == [1.0, 1.5, pytest.approx(1.21)]
    assert chunk[4] == (EOS, 1.0)


def test_small_group_moves_to_next_chunk():
    # 74 single-token words in one segment (a large group: split), then a 3-token weighted group
    base = " ".join(["cat"] * 74)
    chunks = _tok(base + " (a b c:1.2)")
    assert len(chunks) == 2
    assert len(chunks[0]) == len(chunks[1]) == 77
    assert [t for t, _ in chunks[0][:76]].count(shared_bpe().encode("cat")[0]) == 74
    assert chunks[0][75] == (EOS, 1.0) and chunks[0][76] == (EOS, 1.0)  # EOS, then one pad
    assert [w for _, w in chunks[1][1:4]] == [1.2, 1.2, 1.2]


def test_large_group_is_split_at_the_boundary():
    chunks = _tok(" ".join(["cat"] * 100))
    assert [len(c) for c in chunks] == [77, 77]
    cat = shared_bpe().encode("cat")[0]
    assert [t for t, _ in chunks[0]] == [BOS] + [cat] * 75 + [EOS]
    assert [t for t, _ in chunks[1][:27]] == [BOS] + [cat] * 25 + [EOS]


def test_long_word_split_across_chunks():
    word = "z" * 400  # one word of many BPE pieces: longer than a chunk
    pieces = shared_bpe().encode(word)
    assert len(pieces) > 75
    chunks = _tok(f"cat {word}")
    flat = [t for c in chunks for t, _ in c if t not in (BOS, EOS)]
    assert flat[: len(pieces) + 1] == shared_bpe().encode("cat") + pieces


def test_chunk_groups_matches_comfy_rule_for_exact_fit():
    groups = [[(1, 1.0)] * 75]
    (chunk,) = chunk_groups(groups, CLIP_L)
    assert len(chunk) == 77 and chunk[-1] == (EOS, 1.0)
    two = chunk_groups([[(1, 1.0)] * 75, [(2, 1.0)] * 3], CLIP_L)
    assert len(two) == 2 and [t for t, _ in two[1][:5]] == [BOS, 2, 2, 2, EOS]


def test_too_many_chunks_is_refused():
    with pytest.raises(BadRequest) as err:
        _tok(" ".join(["word"] * 10_000), max_chunks=8)
    assert err.value.details["chunks"] > 8


def test_embeddings(tmp_path):
    emb = tmp_path / "embeddings"
    sub = emb / "sub"
    sub.mkdir(parents=True)
    vec_l = torch.randn(2, 768)
    save_file({"clip_l": vec_l, "clip_g": torch.randn(2, 1280)}, str(emb / "style.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(sub / "one.safetensors"))
    (emb / "pickled.pt").write_bytes(b"not loaded")
    store = EmbeddingStore(ModelRoots([tmp_path]))
    warnings: list[str] = []
    (chunk,) = _tok(
        "a embedding:style, (embedding:one:1.3) embedding:pickled cat", store=store, warnings=warnings
    )
    tokens = [t for t, _ in chunk]
    assert tokens[1] == shared_bpe().encode("a")[0]
    assert torch.equal(tokens[2], vec_l[0]) and torch.equal(tokens[3], vec_l[1])
    assert tokens[4] == shared_bpe().encode(",")[0]  # the comma after the name is kept as text
    assert isinstance(tokens[5], torch.Tensor) and chunk[5][1] == 1.3
    assert tokens[6] == shared_bpe().encode("cat")[0] and tokens[7] == EOS
    assert len(warnings) == 1 and "pickled" in warnings[0]
    (chunk_g,) = _tok("embedding:style", CLIP_G, store=store, warnings=[])
    assert chunk_g[1][0].shape == (1280,)
