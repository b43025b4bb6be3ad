"""Flux and SD3 conditioning (CLIP-L / CLIP-G / T5-XXL) of the CLIP service against in-process references.

The references load the fixture files on their own into transformers' T5EncoderModel / CLIPTextModel(
WithProjection) in float32 (ComfyUI computes T5 in float32 too, see luna_stack.clip.t5_encoder), run
them with input ids, and apply ComfyUI's rules written out here (comfy/sd1_clip.py ClipTokenWeightEncoder,
comfy/text_encoders/flux.py FluxClipModel, sd3_clip.py SD3ClipModel).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from luna_stack.client.http import AsyncClient
from luna_stack.clip.bpe import shared_bpe
from luna_stack.clip.cache import cache_key
from luna_stack.clip.conditioning import EncodeJob
from luna_stack.clip.family import build
from luna_stack.clip.models import load_clip_model
from luna_stack.clip.t5_conditioning import encode_t5_jobs
from luna_stack.clip.t5_tokenize import FLUX_MIN_LENGTH, SD3_MIN_LENGTH, shared_t5_tokenizer, tokenize_t5
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, tokenize
from luna_stack.devtools.fixtures import clip_config, write_clip
from luna_stack.devtools.fixtures_t5 import t5_config, write_sd3_text, write_t5, write_t5_gguf
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest, LimitExceeded

from .conftest import make_settings
from .test_clip_conditioning import LONG, SHORT, WEIGHTED, _reference, _reference_l

FLUX = "clip_l.safetensors+t5xxl.safetensors"
SD3 = "clip_l.safetensors+clip_g.safetensors+t5xxl.safetensors"
PROMPTS = [SHORT, WEIGHTED, LONG, ""]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> ModelRoots:
    root = tmp_path_factory.mktemp("t5_models")
    write_clip(root / "clip" / "clip_l.safetensors", "l", "small", seed=3, dtype=torch.float32)
    write_clip(root / "clip" / "clip_g.safetensors", "g", "small", seed=3, dtype=torch.float32)
    write_t5(root / "text_encoders" / "t5xxl.safetensors", "small", seed=3, dtype=torch.float16)
    write_t5(
        root / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", "small", seed=3, dtype=torch.float8_e4m3fn
    )
    write_sd3_text(root / "checkpoints" / "sd3-text.safetensors", "small", seed=3, dtype=torch.float32)
    write_t5_gguf(root / "text_encoders" / "t5xxl-Q8_0.gguf", "small", seed=3)
    return ModelRoots([root])


def ref_t5(path: Path, prefix: str = "") -> T5EncoderModel:
    sd = {k[len(prefix) :]: v.float() for k, v in load_file(path).items() if k.startswith(prefix)}
    model = T5EncoderModel(T5Config(**t5_config("small"))).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and missing == ["encoder.embed_tokens.weight"]
    model.encoder.embed_tokens = model.shared
    return model


def ref_clip(path: Path, which: str, prefix: str = ""):
    if which == "l":
        return _reference_l(path, prefix)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config("g", "small"))).eval()
    sd = {k[len(prefix) :]: v.float() for k, v in load_file(path).items() if k.startswith(prefix)}
    if not hasattr(model, "text_model"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


def t5_tokens(text: str, min_length: int = FLUX_MIN_LENGTH):
    return tokenize_t5(text, min_length, shared_t5_tokenizer(), None, [], 512)


def clip_chunks(text: str, spec):
    return tokenize(text, spec, shared_bpe(), None, [], 64)


@torch.no_grad()
def t5_expected(model: T5EncoderModel, seq, clip_skip: int | None = None) -> torch.Tensor:
    """ComfyUI's T5XXLModel: last layer after the final norm (or block clip_skip, normed); weights against
    the empty sequence `</s>` + pad of the same length."""
    ids = torch.tensor([[t for t, _ in seq], [1] + [0] * (len(seq) - 1)])
    if clip_skip is None or -clip_skip > model.config.num_layers:
        z = model(input_ids=ids).last_hidden_state
    else:
        seen = {}
        block = model.encoder.block[model.config.num_layers + clip_skip]
        hook = block.register_forward_hook(lambda m, a, out: seen.update(h=out[0]))  # None: output kept
        model(input_ids=ids)
        hook.remove()
        z = model.encoder.final_layer_norm(seen["h"])
    row, empty = z[0].clone(), z[1]
    for j, (_, w) in enumerate(seq):
        if w != 1.0:
            row[j] = (z[0, j] - empty[j]) * w + empty[j]
    return row.unsqueeze(0)


def flux_expected(ref_l, ref_5, text: str, clip_skip: int | None = None):
    cond = t5_expected(ref_5, t5_tokens(text), clip_skip)
    _, pooled = _reference(ref_l, CLIP_L, clip_chunks(text, CLIP_L), clip_skip, True)
    return cond, pooled


def sd3_expected(ref_l, ref_g, ref_5, text: str, width: int):
    l_cond, l_pooled = _reference(ref_l, CLIP_L, clip_chunks(text, CLIP_L), -2, False)
    g_cond, g_pooled = _reference(ref_g, CLIP_G, clip_chunks(text, CLIP_G), -2, False)
    lg = torch.nn.functional.pad(torch.cat([l_cond, g_cond], dim=-1), (0, width - 96))
    t5 = t5_expected(ref_5, t5_tokens(text, SD3_MIN_LENGTH)) if ref_5 is not None else None
    cond = torch.cat([lg, t5], dim=-2) if t5 is not None else lg
    return cond, torch.cat([l_pooled, g_pooled], dim=-1)


def _encode(model, family: str, text: str, clip_skip=None):
    chunks = {s.key: clip_chunks(text, s) for s in model.specs}
    if model.t5 is not None:
        chunks["t5xxl"] = [t5_tokens(text, FLUX_MIN_LENGTH if family == "flux" else SD3_MIN_LENGTH)]
    ((cond, pooled),) = encode_t5_jobs(model, family, [EncodeJob(chunks, clip_skip)])
    return cond, pooled


def _paths(roots: ModelRoots):
    return (
        roots.resolve("clip_l.safetensors", ["clip"]),
        roots.resolve("clip_g.safetensors", ["clip"]),
        roots.resolve("t5xxl.safetensors", ["text_encoders"]),
    )


@pytest.mark.parametrize("text", PROMPTS)
def test_flux_matches_transformers(roots, text):
    model = load_clip_model(FLUX, roots)
    assert model.family == "flux" and model.t5 is not None and model.t5.storage_dtype == torch.float16
    l_path, _, t5_path = _paths(roots)
    ref_l, ref_5 = ref_clip(l_path, "l"), ref_t5(t5_path)
    for clip_skip in (None, -2):
        cond, pooled = _encode(model, "flux", text, clip_skip)
        want_cond, want_pooled = flux_expected(ref_l, ref_5, text, clip_skip)
        assert cond.shape == (1, max(256, len(t5_tokens(text))), 128) and pooled.shape == (1, 32)
        # the same modules on the same fp32 values (fp16 storage upcast per layer): bitwise on CPU
        assert torch.equal(cond, want_cond)
        torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)


def test_sd3_matches_transformers_and_missing_encoders(roots):
    l_path, g_path, t5_path = _paths(roots)
    ref_l, ref_g, ref_5 = ref_clip(l_path, "l"), ref_clip(g_path, "g"), ref_t5(t5_path)
    triple = load_clip_model(SD3, roots)
    assert triple.family == "sd3"
    for text in (SHORT, WEIGHTED, LONG):
        cond, pooled = _encode(triple, "sd3", text)
        want_cond, want_pooled = sd3_expected(ref_l, ref_g, ref_5, text, 128)
        torch.testing.assert_close(cond, want_cond, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)
    # SD3.5's all-in-one text section: the same conditioning
    ckpt = load_clip_model("sd3-text.safetensors", roots)
    assert ckpt.family == "sd3" and set(ckpt.encoders) == {"l", "g", "t5xxl"}
    a, b = _encode(ckpt, "sd3", WEIGHTED), _encode(triple, "sd3", WEIGHTED)
    torch.testing.assert_close(a[0][:, :77], b[0][:, :77], rtol=0, atol=1e-5)  # same CLIP weights
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)
    sd3_t5 = ref_t5(
        roots.resolve("sd3-text.safetensors", ["checkpoints"]), "text_encoders.t5xxl.transformer."
    )
    assert torch.equal(a[0][:, 77:], t5_expected(sd3_t5, t5_tokens(WEIGHTED, 77)))  # its T5 is fp32
    # no T5 (DualCLIPLoader type=sd3 on clip_l+clip_g): CLIP part padded to 4096
    pair = load_clip_model("clip_l.safetensors+clip_g.safetensors", roots)
    assert pair.families == ("sdxl", "sd3")
    cond, pooled = _encode(pair, "sd3", SHORT)
    want_cond, want_pooled = sd3_expected(ref_l, ref_g, None, SHORT, 4096)
    torch.testing.assert_close(cond, want_cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)
    # no CLIP-G (Flux pair as sd3): L padded to T5's width, pooled L ++ 1280 zeros
    flux_pair = load_clip_model(FLUX, roots)
    cond, pooled = _encode(flux_pair, "sd3", SHORT)
    l_cond, l_pooled = _reference(ref_l, CLIP_L, clip_chunks(SHORT, CLIP_L), -2, False)
    want = torch.cat([torch.nn.functional.pad(l_cond, (0, 96)), t5_expected(ref_5, t5_tokens(SHORT, 77))], 1)
    torch.testing.assert_close(cond, want, rtol=0, atol=1e-5)
    assert pooled.shape == (1, 32 + 1280) and not pooled[:, 32:].any()
    torch.testing.assert_close(pooled[:, :32], l_pooled, rtol=0, atol=1e-5)
    # T5 alone: cond = T5, pooled = 2048 zeros
    alone = load_clip_model("t5xxl.safetensors", roots)
    cond, pooled = _encode(alone, "sd3", WEIGHTED)
    assert torch.equal(cond, t5_expected(ref_5, t5_tokens(WEIGHTED, 77))) and not pooled.any()
    assert pooled.shape == (1, 2048)


def test_fp8_storage_stays_fp8_and_computes_upcast(roots):
    model = load_clip_model("t5xxl_fp8_e4m3fn.safetensors", roots)
    t5 = model.t5
    assert t5 is not None and t5.storage_dtype == torch.float8_e4m3fn
    q = t5.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.weight.dtype == torch.float8_e4m3fn  # resident as stored
    path = roots.resolve("t5xxl_fp8_e4m3fn.safetensors", ["text_encoders"])
    ref = ref_t5(path)  # the fp8 values upcast once, in float32
    seq = t5_tokens(WEIGHTED, 77)
    cond, _ = _encode(model, "sd3", WEIGHTED)
    assert torch.equal(cond, t5_expected(ref, seq))


def test_gguf_t5_stays_quantized_and_matches_its_dequantized_weights(roots):
    import gguf
    import numpy as np

    model = load_clip_model("t5xxl-Q8_0.gguf", roots)
    q = model.t5.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.parametrizations.weight.original.dtype == torch.uint8  # Q8_0 blocks resident
    # reference: the gguf package's own dequantization, ComfyUI-GGUF's names, transformers' T5
    names = {
        "enc.": "encoder.",
        ".blk.": ".block.",
        "token_embd": "shared",
        "output_norm": "final_layer_norm",
    }
    names |= {f"attn_{x}": f"layer.0.SelfAttention.{x}" for x in "qkvo"}
    names |= {
        "attn_norm": "layer.0.layer_norm",
        "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    }
    names |= {"ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo"}
    names |= {"ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_norm": "layer.1.layer_norm"}
    sd = {}
    for t in gguf.GGUFReader(str(roots.resolve("t5xxl-Q8_0.gguf", ["text_encoders"]))).tensors:
        key = t.name
        for old, new in names.items():
            key = key.replace(old, new)
        values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type))
        sd[key] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tuple(reversed(t.shape)))
    ref = T5EncoderModel(T5Config(**t5_config("small"))).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and missing == ["encoder.embed_tokens.weight"]
    ref.encoder.embed_tokens = ref.shared
    cond, _ = _encode(model, "sd3", WEIGHTED)
    torch.testing.assert_close(cond, t5_expected(ref, t5_tokens(WEIGHTED, 77)), rtol=0, atol=1e-5)
    # and close to the unquantized fp16 file (Q8_0 error only)
    fp16, _ = _encode(load_clip_model("t5xxl.safetensors", roots), "sd3", WEIGHTED)
    assert (cond - fp16).abs().max() < 0.05 * fp16.abs().max()


def test_batch_rows_of_other_lengths_do_not_change_a_result(roots):
    model = load_clip_model(FLUX, roots)
    texts = [SHORT, LONG, WEIGHTED, " ".join(["long"] * 300), ""]
    jobs = []
    for i, text in enumerate(texts):
        chunks = {"l": clip_chunks(text, CLIP_L), "t5xxl": [t5_tokens(text)]}
        jobs.append(EncodeJob(chunks, -2 if i == 2 else None))
    assert sorted(len(j.chunks["t5xxl"][0]) for j in jobs) == [256] * 4 + [301]  # two forwards
    together = encode_t5_jobs(model, "flux", jobs)
    for job, (cond, pooled) in zip(jobs, together, strict=True):
        ((alone, alone_pooled),) = encode_t5_jobs(model, "flux", [job])
        assert torch.equal(cond, alone) and torch.equal(pooled, alone_pooled)


# ---------------------------------------------------------------------------------------- the service


def _t5_lora(path: Path, model: T5EncoderModel, prefix: str, rank: int = 4, seed: int = 0) -> dict:
    """A kohya-named T5 LoRA on every attention projection (`<prefix>encoder_block_N_..._SelfAttention_q`)."""
    gen = torch.Generator().manual_seed(seed)
    truth, tensors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".SelfAttention." in name:
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=gen) * 0.05
            base = prefix + name.replace(".", "_")
            tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
            tensors[f"{base}.alpha"] = torch.tensor(float(rank))
            truth[name] = (down, up)
    save_file(tensors, str(path))
    return truth


async def test_service_flux_sd3_tokens_lora_and_errors(models_dir, redis_url, start_service):
    clip_dir = models_dir / "clip"
    l_path, g_path, t5_path = (
        clip_dir / "clip_l.safetensors",
        clip_dir / "clip_g.safetensors",
        clip_dir / "t5xxl.safetensors",
    )
    ref_l, ref_g, ref_5 = ref_clip(l_path, "l"), ref_clip(g_path, "g"), ref_t5(t5_path)
    loras = models_dir / "loras"
    truth_5 = _t5_lora(loras / "flux-te.safetensors", ref_5, "lora_te2_")  # Flux: T5 under lora_te2_
    truth_l = write_lora(loras / "flux-te-l.safetensors", ref_l, "clip_l", "kohya", rank=4, seed=5)
    save_file(
        {**load_file(loras / "flux-te.safetensors"), **load_file(loras / "flux-te-l.safetensors")},
        str(loras / "flux-te.safetensors"),
    )
    svc = start_service(
        build, make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_CLIP_MAX_DELAY_MS="100")
    )
    async with AsyncClient("clip", url=svc.url) as client:
        for text in (SHORT, WEIGHTED):
            out, info = await client.call("encode", params={"model": FLUX, "text": text, "cache": False})
            want_cond, want_pooled = flux_expected(ref_l, ref_5, text)
            assert info["family"] == "flux" and info["t5_tokens"] == 256
            torch.testing.assert_close(out["cond"], want_cond, rtol=0, atol=1e-5)
            torch.testing.assert_close(out["pooled"], want_pooled, rtol=0, atol=1e-5)

        # CLIPTextEncodeFlux: separate CLIP-L and T5 texts
        out, _ = await client.call("encode", params={"model": FLUX, "text_l": SHORT, "text_t5xxl": LONG})
        torch.testing.assert_close(out["cond"], t5_expected(ref_5, t5_tokens(LONG)), rtol=0, atol=1e-5)
        _, want_pooled = flux_expected(ref_l, ref_5, SHORT)
        torch.testing.assert_close(out["pooled"], want_pooled, rtol=0, atol=1e-5)

        # tokens in (ComfyUI's token dict: l chunks, one t5xxl list) == text in
        _, tok = await client.call("tokenize", params={"model": FLUX, "text": WEIGHTED})
        assert set(tok["tokens"]) == {"l", "t5xxl"} and len(tok["tokens"]["t5xxl"]) == 1
        by_tokens, _ = await client.call(
            "encode", params={"model": FLUX, "tokens": tok["tokens"], "cache": False}
        )
        by_text, _ = await client.call("encode", params={"model": FLUX, "text": WEIGHTED, "cache": False})
        assert torch.equal(by_tokens["cond"], by_text["cond"]) and torch.equal(
            by_tokens["pooled"], by_text["pooled"]
        )

        # SD3 from the triple; the Flux pair as sd3 (DualCLIPLoader type=sd3)
        out, info = await client.call("encode", params={"model": SD3, "text": WEIGHTED})
        want_cond, want_pooled = sd3_expected(ref_l, ref_g, ref_5, WEIGHTED, 128)
        assert info["family"] == "sd3" and info["t5_tokens"] == 77
        torch.testing.assert_close(out["cond"], want_cond, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["pooled"], want_pooled, rtol=0, atol=1e-5)
        as_sd3, info = await client.call("encode", params={"model": FLUX, "text": SHORT, "family": "sd3"})
        assert info["family"] == "sd3" and as_sd3["cond"].shape == (1, 77 + 77, 128)

        # the cache keys on family and T5 tokens
        p = {"model": FLUX, "text": "a cache probe"}
        await client.call("encode", params=p)
        _, second = await client.call("encode", params=p)
        _, other_t5 = await client.call("encode", params={**p, "text_t5xxl": "a cache probe!"})
        _, other_family = await client.call("encode", params={**p, "family": "sd3"})
        assert (second["cache"], other_t5["cache"], other_family["cache"]) == ("hit", "miss", "miss")

        # LoRA on CLIP-L and T5 == merged copies; the shared weights stay clean
        lora = {"model": FLUX, "text": WEIGHTED, "lora": [{"name": "flux-te.safetensors", "strength": 0.7}]}
        with_lora, _ = await client.call("encode", params={**lora, "cache": False})
        merged_5 = ref_t5(t5_path)
        with torch.no_grad():
            for name, (down, up) in truth_5.items():
                merged_5.get_submodule(name).weight += 0.7 * (up @ down)
        merged_l = ref_clip(l_path, "l")
        with torch.no_grad():
            for name, f in truth_l.items():
                merged_l.get_submodule(name).weight += 0.7 * f.scale * (f.up @ f.down)
        want_cond, want_pooled = flux_expected(merged_l, merged_5, WEIGHTED)
        torch.testing.assert_close(with_lora["cond"], want_cond, rtol=0, atol=1e-4)
        torch.testing.assert_close(with_lora["pooled"], want_pooled, rtol=0, atol=1e-4)
        assert not torch.allclose(with_lora["cond"], by_text["cond"], atol=1e-3)
        again, _ = await client.call("encode", params={"model": FLUX, "text": WEIGHTED, "cache": False})
        assert torch.equal(again["cond"], by_text["cond"])

        # concurrent requests of different T5 lengths: each gets what it gets alone
        texts = [SHORT, " ".join(["word"] * 280), WEIGHTED, LONG]
        together = await asyncio.gather(
            *(client.call("encode", params={"model": FLUX, "text": t, "cache": False}) for t in texts)
        )
        for text, (out, _) in zip(texts, together, strict=True):
            alone, _ = await client.call("encode", params={"model": FLUX, "text": text, "cache": False})
            assert torch.equal(out["cond"], alone["cond"]) and torch.equal(out["pooled"], alone["pooled"])

        good_l = tok["tokens"]["l"]
        failures = [
            ({"model": FLUX, "text": " ".join(["word"] * 600)}, LimitExceeded),
            ({"model": FLUX, "tokens": {"l": good_l, "t5xxl": [[32128, 1.0]]}}, BadRequest),
            ({"model": FLUX, "tokens": {"l": good_l, "t5xxl": [[1, 1.0]] * 513}}, LimitExceeded),
            ({"model": FLUX, "tokens": {"l": good_l}}, BadRequest),  # no t5xxl
            ({"model": "sd15-small.safetensors", "tokens": {"l": good_l, "t5xxl": [[1, 1.0]]}}, BadRequest),
            ({"model": FLUX, "text": "x", "family": "sdxl"}, BadRequest),
            ({"model": SD3, "text": "x", "family": "flux"}, BadRequest),
            (
                {"model": "clip_g.safetensors+t5xxl.safetensors", "text": "x"},
                BadRequest,
            ),  # CLIP wider than T5
        ]
        for params, error in failures:
            with pytest.raises(error):
                await client.call("encode", params=params)
        status = await client.status()
        assert status["lora_cache"]["entries"] >= 1


def test_cache_key_covers_t5_and_family():
    chunks = {"l": clip_chunks(SHORT, CLIP_L), "t5xxl": [t5_tokens(SHORT)]}
    base = cache_key("m", "fp32", chunks, None, (), "flux")
    other = {**chunks, "t5xxl": [t5_tokens(SHORT + " dog")]}
    reweighted = {**chunks, "t5xxl": [[(t, 1.5) for t, _ in chunks["t5xxl"][0]]]}
    keys = {
        cache_key("m", "fp32", other, None, (), "flux"),
        cache_key("m", "fp32", reweighted, None, (), "flux"),
        cache_key("m", "fp32", chunks, None, (), "sd3"),
    }
    assert base not in keys and len(keys) == 3


async def test_half_precision_service_keeps_t5_in_float32(tmp_path, start_service):
    """With the service in fp16 (the GPU default) CLIP runs in fp16, T5 still in float32 with float32
    LoRA factors (their own cache): from an fp16 T5 file (stored as is by both), T5's conditioning is
    bitwise the fp32 service's, LoRA included."""
    write_clip(tmp_path / "clip" / "clip_l.safetensors", "l", "small", seed=6, dtype=torch.float32)
    t5_path = write_t5(tmp_path / "clip" / "t5xxl.safetensors", "small", seed=6, dtype=torch.float16)
    (tmp_path / "loras").mkdir()
    _t5_lora(tmp_path / "loras" / "t5-only.safetensors", ref_t5(t5_path), "lora_te3_", seed=2)
    params = {"model": FLUX, "text": WEIGHTED, "cache": False, "lora": [{"name": "t5-only.safetensors"}]}
    half = start_service(build, make_settings(tmp_path, LUNA_DTYPE="fp16"))
    full = start_service(build, make_settings(tmp_path))
    async with AsyncClient("clip", url=half.url) as a, AsyncClient("clip", url=full.url) as b:
        (h, _), (f, _) = await a.call("encode", params=params), await b.call("encode", params=params)
        plain, _ = await b.call("encode", params={**params, "lora": []})
    assert h["cond"].dtype == torch.float32 and torch.equal(h["cond"], f["cond"])
    assert not torch.allclose(f["cond"], plain["cond"], atol=1e-3)  # the T5 LoRA acted
    torch.testing.assert_close(h["pooled"], f["pooled"], rtol=0, atol=2e-2)  # CLIP-L in fp16


def test_t5_embedding_of_another_width_is_dropped_and_padded(roots):
    """ComfyUI's process_tokens: a vector that is not 128 (4096) wide is dropped, a pad goes at the end."""
    model = load_clip_model(FLUX, roots)
    seq = t5_tokens("a cat")
    with_vector = [seq[0], (torch.ones(32), 1.0), *seq[1:-1]]  # a CLIP-L-wide vector, same length
    padded = [seq[0], *seq[1:-1], (0, 1.0)]
    jobs = [EncodeJob({"l": clip_chunks("a cat", CLIP_L), "t5xxl": [c]}) for c in (with_vector, padded)]
    (a, _), (b, _) = encode_t5_jobs(model, "flux", jobs)
    assert torch.equal(a, b)


def test_lora_files_name_t5_as_comfyui_does():
    from luna_stack.lora.format import parse_lora

    pair = {"lora_down.weight": torch.ones(2, 8), "lora_up.weight": torch.ones(8, 2)}
    names = [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",  # CLIP-G (SDXL / SD3)
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q",  # T5 in Flux files (OneTrainer / kohya)
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo",  # T5 in SD3 files
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
    ]
    sd = {f"{name}.{suffix}": t for name in names for suffix, t in pair.items()}
    parsed = parse_lora(sd, "te.safetensors")
    assert parsed.components == ("clip_l", "clip_g", "t5xxl")
    assert sorted((t.component, t.name) for t in parsed.targets) == [
        ("clip_g", "text_model_encoder_layers_0_self_attn_q_proj"),
        ("clip_l", "text_model.encoder.layers.0.mlp.fc1"),
        ("clip_l", "text_model_encoder_layers_0_self_attn_q_proj"),
        ("t5xxl", "encoder.block.0.layer.0.SelfAttention.k"),
        ("t5xxl", "encoder_block_0_layer_0_SelfAttention_q"),
        ("t5xxl", "encoder_block_1_layer_1_DenseReluDense_wo"),
    ]
