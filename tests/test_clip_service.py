"""The CLIP service over HTTP (real aiohttp server, real redis-server) against in-process references."""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load_file, save_file

from luna_stack.client.http import AsyncClient
from luna_stack.clip.bpe import shared_bpe
from luna_stack.clip.cache import cache_key
from luna_stack.clip.family import build
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, tokenize
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.wire.errors import BadRequest, ModelLoadError, PathNotAllowed, UnknownModel

from .conftest import make_settings
from .test_clip_conditioning import LONG, SHORT, WEIGHTED, _reference, _reference_g, _reference_l

SD15 = "sd15-small.safetensors"
SDXL = "sdxl-small.safetensors"


def _chunks(text: str, spec):
    return tokenize(text, spec, shared_bpe(), None, [], 64)


def _sd15_ref(models_dir):
    return _reference_l(models_dir / "checkpoints" / SD15, "cond_stage_model.transformer.")


def _sdxl_refs(models_dir):
    path = models_dir / "checkpoints" / SDXL
    return _reference_l(path, "conditioner.embedders.0.transformer."), _reference_g(path)


def _sdxl_expected(ref_l, ref_g, text_l: str, text_g: str | None = None):
    chunks_l, chunks_g = _chunks(text_l, CLIP_L), _chunks(text_g if text_g is not None else text_l, CLIP_G)
    l_cond, _ = _reference(ref_l, CLIP_L, chunks_l, -2, False)
    g_cond, g_pooled = _reference(ref_g, CLIP_G, chunks_g, -2, False)
    return torch.cat([l_cond, g_cond], dim=-1), g_pooled


def _post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_encode_matches_transformers(models_dir, redis_url, start_service):
    svc = start_service(build, make_settings(models_dir, LUNA_REDIS_URL=redis_url))
    async with AsyncClient("clip", url=svc.url) as client:
        ref = _sd15_ref(models_dir)
        for text in (SHORT, WEIGHTED, LONG, ""):
            for clip_skip in (None, -2):
                params = {"model": SD15, "text": text, **({"clip_skip": clip_skip} if clip_skip else {})}
                out, info = await client.call("encode", params=params)
                want_cond, want_pooled = _reference(ref, CLIP_L, _chunks(text, CLIP_L), clip_skip, True)
                assert info["family"] == "sd15" and info["chunks"] == want_cond.shape[1] // 77
                torch.testing.assert_close(out["cond"], want_cond, rtol=0, atol=1e-5)
                torch.testing.assert_close(out["pooled"], want_pooled, rtol=0, atol=1e-5)

        ref_l, ref_g = _sdxl_refs(models_dir)
        for text in (SHORT, WEIGHTED, LONG):
            out, info = await client.call("encode", params={"model": SDXL, "text": text})
            want_cond, want_pooled = _sdxl_expected(ref_l, ref_g, text)
            assert out["cond"].shape[-1] == 32 + 64 and "width" not in info
            torch.testing.assert_close(out["cond"], want_cond, rtol=0, atol=1e-5)
            torch.testing.assert_close(out["pooled"], want_pooled, rtol=0, atol=1e-5)

        # CLIPTextEncodeSDXL: separate texts (the shorter padded with empty chunks), sizes passed through
        params = {"model": SDXL, "text_g": LONG, "text_l": SHORT, "width": 832, "crop_h": 16}
        out, info = await client.call("encode", params=params)
        long_g = _chunks(LONG, CLIP_G)
        assert len(long_g) > 1
        want_l, _ = _reference(
            ref_l, CLIP_L, _chunks(SHORT, CLIP_L) + _chunks("", CLIP_L) * (len(long_g) - 1), -2, False
        )
        want_g, want_pooled = _reference(ref_g, CLIP_G, long_g, -2, False)
        torch.testing.assert_close(out["cond"], torch.cat([want_l, want_g], dim=-1), rtol=0, atol=1e-5)
        torch.testing.assert_close(out["pooled"], want_pooled, rtol=0, atol=1e-5)
        assert {
            k: info[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
        } == {
            "width": 832,
            "height": 1024,
            "crop_w": 0,
            "crop_h": 16,
            "target_width": 1024,
            "target_height": 1024,
        }

        # the same model named as its standalone pair gives the same conditioning (same weights)
        pair, _ = await client.call(
            "encode", params={"model": "clip_l.safetensors+clip_g.safetensors", "text": SHORT}
        )
        single, _ = await client.call("encode", params={"model": SDXL, "text": SHORT})
        assert torch.equal(pair["cond"], single["cond"])

        # tokens in (what ComfyUI's tokenizer produced) == text in; tokenize round-trips
        _, tok = await client.call("tokenize", params={"model": SDXL, "text": WEIGHTED})
        assert set(tok["tokens"]) == {"l", "g"} and tok["tokens"]["g"][0][-1] == [0, 1.0]
        by_tokens, _ = await client.call(
            "encode", params={"model": SDXL, "tokens": tok["tokens"], "cache": False}
        )
        by_text, _ = await client.call("encode", params={"model": SDXL, "text": WEIGHTED, "cache": False})
        assert torch.equal(by_tokens["cond"], by_text["cond"])

        # dual: positive and negative in one call == two calls
        dual, dual_info = await client.call(
            "encode_dual", params={"model": SDXL, "positive": {"text": WEIGHTED}, "negative": {"text": ""}}
        )
        neg, _ = await client.call("encode", params={"model": SDXL, "text": ""})
        assert torch.equal(dual["positive_cond"], by_text["cond"])
        assert torch.equal(dual["negative_cond"], neg["cond"]) and torch.equal(
            dual["negative_pooled"], neg["pooled"]
        )
        assert dual_info["positive"]["chunks"] == 1

        models = await client.get_json("/v1/clip/models")
        assert {m["family"] for m in models["loaded"]} == {"sd15", "sdxl"}
        assert "checkpoints/sd15-small.safetensors" in models["available"]


async def test_cache_hits_and_counters(models_dir, redis_url, start_service):
    settings = make_settings(models_dir, LUNA_REDIS_URL=redis_url)
    first = start_service(build, settings)
    second = start_service(build, settings)  # another replica: shares the cache through Redis
    async with AsyncClient("clip", url=first.url) as a, AsyncClient("clip", url=second.url) as b:
        params = {"model": SDXL, "text": WEIGHTED, "clip_skip": -2}
        miss, miss_info = await a.call("encode", params=params)
        hit, hit_info = await a.call("encode", params=params)
        other, other_info = await b.call("encode", params=params)
        assert (miss_info["cache"], hit_info["cache"], other_info["cache"]) == ("miss", "hit", "hit")
        for out in (hit, other):
            assert torch.equal(out["cond"], miss["cond"]) and torch.equal(out["pooled"], miss["pooled"])
        # anything the output depends on is part of the key
        _, info = await a.call("encode", params={**params, "clip_skip": -1})
        assert info["cache"] == "miss"
        status = await a.status()
        assert status["conditioning_cache"]["hits"] == 1 and status["conditioning_cache"]["misses"] == 2
        assert status["batching"]["batches"] == 2  # hits never reached the model
    with urllib.request.urlopen(first.url + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'luna_clip_cache_lookups_total{result="hit"} 1.0' in metrics


async def test_batching_equals_singles(models_dir, start_service):
    svc = start_service(build, make_settings(models_dir, LUNA_CLIP_MAX_DELAY_MS="200"))
    prompts = [SHORT, WEIGHTED, LONG, "", "a red car", "(blue:0.7) sky"]
    async with AsyncClient("clip", url=svc.url) as client:
        await client.call("encode", params={"model": SDXL, "text": "warm up"})
        together = await asyncio.gather(
            *(
                client.call("encode", params={"model": SDXL, "text": p, "clip_skip": -1 - i % 2})
                for i, p in enumerate(prompts)
            )
        )
        status = await client.status()
        singles = [
            await client.call("encode", params={"model": SDXL, "text": p, "clip_skip": -1 - i % 2})
            for i, p in enumerate(prompts)
        ]
    assert status["batching"]["largest_batch"] >= 4  # chunks of several requests in one forward
    for (out, _), (one, _) in zip(together, singles, strict=True):  # bitwise on CPU
        assert torch.equal(out["cond"], one["cond"]) and torch.equal(out["pooled"], one["pooled"])


def _merged(model, truth, strength: float):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, f in truth.items():
            merged.get_submodule(name).weight += strength * f.scale * (f.up.float() @ f.down.float())
    return merged


async def test_lora_matches_merged_copy_and_never_pollutes(models_dir, start_service):
    loras = models_dir / "loras"
    ref = _sd15_ref(models_dir)
    truth = write_lora(
        loras / "clip-te.safetensors", ref, "clip_l", "kohya", rank=4, alpha=2.0, targets="all", kohya_te="te"
    )
    ref_l, ref_g = _sdxl_refs(models_dir)
    truth_l = write_lora(loras / "clip-xl-l.safetensors", ref_l, "clip_l", "peft", rank=4, seed=1)
    truth_g = write_lora(loras / "clip-xl-g.safetensors", ref_g, "clip_g", "peft", rank=4, seed=2)
    both = {**load_file(loras / "clip-xl-l.safetensors"), **load_file(loras / "clip-xl-g.safetensors")}
    save_file(both, str(loras / "clip-xl.safetensors"))

    svc = start_service(build, make_settings(models_dir, LUNA_CLIP_MAX_DELAY_MS="200"))
    async with AsyncClient("clip", url=svc.url) as client:
        plain = {"model": SD15, "text": WEIGHTED}
        lora = {**plain, "lora": [{"name": "clip-te.safetensors", "strength": 0.8}]}
        before, _ = await client.call("encode", params=plain)
        with_lora, _ = await client.call("encode", params=lora)
        after, _ = await client.call("encode", params=plain)
        want, want_pooled = _reference(
            _merged(ref, truth, 0.8), CLIP_L, _chunks(WEIGHTED, CLIP_L), None, True
        )
        torch.testing.assert_close(with_lora["cond"], want, rtol=0, atol=1e-4)
        torch.testing.assert_close(with_lora["pooled"], want_pooled, rtol=0, atol=1e-4)
        assert not torch.allclose(with_lora["cond"], before["cond"], atol=1e-3)
        assert torch.equal(before["cond"], after["cond"]) and torch.equal(before["pooled"], after["pooled"])

        # concurrent mixes of stacks in one batch: every request gets what it gets alone
        batches = (await client.status())["batching"]["batches"]
        mixed = await asyncio.gather(
            *(client.call("encode", params=lora if i % 2 else plain) for i in range(6))
        )
        assert (await client.status())["batching"]["batches"] - batches < 6  # stacks mixed in a batch
        for i, (out, _) in enumerate(mixed):
            if i % 2:
                torch.testing.assert_close(out["cond"], with_lora["cond"], rtol=0, atol=1e-6)
            else:  # rows without LoRA get exactly the base forward
                assert torch.equal(out["cond"], before["cond"]) and torch.equal(
                    out["pooled"], before["pooled"]
                )
        again, _ = await client.call("encode", params=plain)
        assert torch.equal(again["cond"], before["cond"])

        # SDXL: one PEFT file with text_encoder (L) and text_encoder_2 (G) keys
        xl = {"model": SDXL, "text": SHORT, "lora": [{"name": "clip-xl.safetensors", "strength": -0.5}]}
        out, _ = await client.call("encode", params=xl)
        want = _sdxl_expected(_merged(ref_l, truth_l, -0.5), _merged(ref_g, truth_g, -0.5), SHORT)
        torch.testing.assert_close(out["cond"], want[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(out["pooled"], want[1], rtol=0, atol=1e-4)
        status = await client.status()
        assert status["lora_cache"]["entries"] == 2


async def test_bad_inputs_get_4xx_and_the_service_stays_up(models_dir, start_service):
    (models_dir / "loras" / "clip-corrupt.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    )
    emb = models_dir / "embeddings"
    save_file(
        {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, str(emb / "clip-style.safetensors")
    )
    svc = start_service(build, make_settings(models_dir, LUNA_CLIP_MAX_CHUNKS="8"))
    async with AsyncClient("clip", url=svc.url) as client:
        empty, info = await client.call("encode", params={"model": SD15, "text": ""})
        assert empty["cond"].shape == (1, 77, 32) and info["warnings"] == []

        out, info = await client.call("encode", params={"model": SDXL, "text": "a embedding:nope cat"})
        assert info["warnings"] and "nope" in info["warnings"][0]
        plain, _ = await client.call("encode", params={"model": SDXL, "text": "a cat"})
        assert torch.equal(out["cond"], plain["cond"])  # ComfyUI drops an unknown embedding

        styled, info = await client.call(
            "encode", params={"model": SDXL, "text": "a embedding:clip-style cat"}
        )
        assert info["warnings"] == [] and not torch.equal(styled["cond"], plain["cond"])

        unbalanced, _ = await client.call("encode", params={"model": SD15, "text": "a ((cat:1.2) dog) )("})
        assert unbalanced["cond"].shape == (1, 77, 32)

        failures = [
            ({"model": SD15, "text": " ".join(["word"] * 10_000)}, BadRequest),
            ({"model": SD15, "text": "(" * 500 + "x" + ")" * 500}, BadRequest),
            ({"model": "missing.safetensors", "text": "x"}, UnknownModel),
            ({"model": "../../etc/passwd", "text": "x"}, PathNotAllowed),
            ({"model": SD15, "text": "x", "lora": [{"name": "nope.safetensors"}]}, UnknownModel),
            ({"model": SD15, "text": "x", "lora": [{"name": "clip-corrupt.safetensors"}]}, ModelLoadError),
            (
                {"model": SD15, "text": "x", "lora": [{"name": "clip-te.safetensors", "strength": "high"}]},
                BadRequest,
            ),
            ({"model": SD15, "text": "x", "clip_skip": 2}, BadRequest),
            ({"model": SD15, "text": 5}, BadRequest),
            ({"model": SD15, "tokens": {"l": [[[49406, 1.0]] * 10]}}, BadRequest),
            ({"model": SD15, "tokens": {"l": [[[99999, 1.0]] * 77]}}, BadRequest),
            ({"model": SDXL, "tokens": {"l": [[[49406, 1.0]] * 77]}}, BadRequest),
            ({"model": SDXL, "text": "x", "width": -1}, BadRequest),
        ]
        for params, error in failures:
            with pytest.raises(error):
                await client.call("encode", params=params)
        with pytest.raises(BadRequest):
            await client.call("encode_dual", params={"model": SD15, "positive": {"text": "x"}})

    status, body = _post_json(svc.url + "/v1/clip/encode", {"model": SD15, "text": "x", "clip_skip": "a"})
    assert status == 400 and body["error"]["code"] == "bad_request"
    with urllib.request.urlopen(svc.url + "/health/live", timeout=10) as resp:
        assert resp.status == 200


def test_cache_key_covers_every_input():
    chunks = {"l": _chunks(WEIGHTED, CLIP_L), "g": _chunks(WEIGHTED, CLIP_G)}
    base = ("model-sha", "fp16", chunks, None, (("lora-sha", 0.8),))
    key = cache_key(*base)
    assert key == cache_key(*base)
    reweighted = {**chunks, "l": [[(t, 1.0) for t, _ in c] for c in chunks["l"]]}
    with_vector = {**chunks, "l": [[(torch.ones(32), 1.0), *chunks["l"][0][1:]]]}
    other_vector = {**chunks, "l": [[(torch.zeros(32), 1.0), *chunks["l"][0][1:]]]}
    variants = [
        ("other-model", *base[1:]),
        (base[0], "fp32", *base[2:]),
        (base[0], base[1], reweighted, *base[3:]),
        (base[0], base[1], with_vector, *base[3:]),
        (base[0], base[1], other_vector, *base[3:]),
        (*base[:3], -2, base[4]),
        (*base[:4], (("lora-sha", 0.7),)),
        (*base[:4], ()),
    ]
    keys = {cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
