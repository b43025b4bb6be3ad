"""Conditioning of the CLIP service's model code == transformers models run directly on the same weights.

The reference loads the fixture checkpoint on its own (diffusers' convert_open_clip_checkpoint for
CLIP-G), runs transformers' forward with input ids, and applies ComfyUI's rules written out here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from luna_stack.clip.bpe import BOS, EOS, shared_bpe
from luna_stack.clip.conditioning import EncodeJob, encode_jobs
from luna_stack.clip.models import load_clip_model
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, EncoderSpec, empty_ids, tokenize
from luna_stack.devtools.fixtures import clip_config, write_checkpoint, write_clip
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest

SHORT = "a photo of a cat, highly detailed"
WEIGHTED = "a (photo:1.3) of a ((cat)), [dog] (blurry:0.5)"
LONG = ", ".join(f"word{i} (tag{i}:1.2)" for i in range(40))  # ~3 chunks with weights


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> ModelRoots:
    root = tmp_path_factory.mktemp("clip_models")
    write_checkpoint(root / "checkpoints" / "sd15.safetensors", "sd15", "small", seed=1, dtype=torch.float32)
    write_checkpoint(root / "checkpoints" / "sdxl.safetensors", "sdxl", "small", seed=2, dtype=torch.float32)
    write_clip(root / "clip" / "clip_l.safetensors", "l", "small", seed=2, dtype=torch.float32)
    write_clip(root / "clip" / "clip_g.safetensors", "g", "small", seed=2, dtype=torch.float32)
    return ModelRoots([root])


def _reference_l(path: Path, prefix: str) -> CLIPTextModel:
    sd = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
    model = CLIPTextModel(CLIPTextConfig(**clip_config("l", "small"))).eval()
    model.load_state_dict({k.removeprefix("text_model."): v for k, v in sd.items()}, strict=False)
    return model


def _reference_g(path: Path) -> CLIPTextModelWithProjection:
    model = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config("g", "small"))).eval()
    sd = convert_open_clip_checkpoint(model, load_file(path), prefix="conditioner.embedders.1.model.")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


@torch.no_grad()
def _reference(
    model, spec: EncoderSpec, chunks, layer: int | None, norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's rules spelled out: layer choice, weighting against the empty prompt, concatenation."""
    ids = torch.tensor([[t for t, _ in c] for c in chunks] + [empty_ids(spec)])
    out = model(ids, output_hidden_states=True)
    text = getattr(model, "text_model", model)
    z = out.last_hidden_state if layer is None else out.hidden_states[layer]
    if layer is not None and norm:
        z = text.final_layer_norm(z)
    z_empty = z[-1]
    rows = []
    for k, chunk in enumerate(chunks):
        row = z[k].clone()
        for j, (_, w) in enumerate(chunk):
            if w != 1.0:
                row[j] = (z[k, j] - z_empty[j]) * w + z_empty[j]
        rows.append(row)
    cond = torch.cat(rows).unsqueeze(0)
    eos = [t for t, _ in chunks[0]].index(EOS)
    if isinstance(model, CLIPTextModelWithProjection):
        pooled = out.text_embeds[0:1]
        assert eos == int((ids[0] == EOS).int().argmax())
    else:
        pooled = out.last_hidden_state[0:1, eos]
    return cond, pooled


def _chunks(text: str, spec: EncoderSpec):
    return tokenize(text, spec, shared_bpe(), None, [], max_chunks=64)


@pytest.mark.parametrize("text", [SHORT, WEIGHTED, LONG, ""])
@pytest.mark.parametrize("clip_skip", [None, -2])
def test_sd15_matches_transformers(roots, text, clip_skip):
    model = load_clip_model("sd15.safetensors", roots)
    assert model.family == "sd15"
    ref = _reference_l(roots.resolve("sd15.safetensors", ["checkpoints"]), "cond_stage_model.transformer.")
    chunks = _chunks(text, CLIP_L)
    ((cond, pooled),) = encode_jobs(model.encoders, "sd15", [EncodeJob({"l": chunks}, clip_skip)])
    # SD1.5: last layer by default; clip skip -n = hidden_states[-n] through the final layer norm.
    want_cond, want_pooled = _reference(ref, CLIP_L, chunks, None if clip_skip is None else clip_skip, True)
    assert cond.shape == (1, 77 * len(chunks), 32) and pooled.shape == (1, 32)
    torch.testing.assert_close(cond, want_cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("text", [SHORT, WEIGHTED, LONG])
def test_sdxl_matches_transformers(roots, text):
    model = load_clip_model("sdxl.safetensors", roots)
    assert model.family == "sdxl"
    path = roots.resolve("sdxl.safetensors", ["checkpoints"])
    ref_l = _reference_l(path, "conditioner.embedders.0.transformer.")
    ref_g = _reference_g(path)
    chunks_l, chunks_g = _chunks(text, CLIP_L), _chunks(text, CLIP_G)
    assert [t for t, _ in chunks_g[-1]][-1] == 0  # CLIP-G pads with 0
    ((cond, pooled),) = encode_jobs(model.encoders, "sdxl", [EncodeJob({"l": chunks_l, "g": chunks_g})])
    l_cond, _ = _reference(ref_l, CLIP_L, chunks_l, -2, False)
    g_cond, g_pooled = _reference(ref_g, CLIP_G, chunks_g, -2, False)
    assert cond.shape == (1, 77 * len(chunks_l), 32 + 64) and pooled.shape == (1, 64)
    torch.testing.assert_close(cond, torch.cat([l_cond, g_cond], dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, g_pooled, rtol=0, atol=1e-5)


def test_standalone_pair_equals_checkpoint(roots):
    ckpt = load_clip_model("sdxl.safetensors", roots)
    pair = load_clip_model("clip_g.safetensors+clip_l.safetensors", roots)
    assert pair.family == "sdxl" and pair.content_id == ckpt.content_id
    job = EncodeJob({"l": _chunks(WEIGHTED, CLIP_L), "g": _chunks(WEIGHTED, CLIP_G)})
    (a,) = encode_jobs(ckpt.encoders, "sdxl", [job])
    (b,) = encode_jobs(pair.encoders, "sdxl", [job])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert load_clip_model("clip_l.safetensors", roots).family == "sd15"
    with pytest.raises(BadRequest):
        load_clip_model("clip_g.safetensors", roots)


def test_batch_equals_singles(roots):
    model = load_clip_model("sdxl.safetensors", roots)
    jobs = [
        EncodeJob({"l": _chunks(t, CLIP_L), "g": _chunks(t, CLIP_G)}, skip)
        for t, skip in [(SHORT, None), (WEIGHTED, -1), (LONG, None), ("", -2)]
    ]
    together = encode_jobs(model.encoders, "sdxl", jobs)
    for job, (cond, pooled) in zip(jobs, together, strict=True):
        ((c1, p1),) = encode_jobs(model.encoders, "sdxl", [job])
        torch.testing.assert_close(cond, c1, rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled, p1, rtol=0, atol=1e-6)


def test_embedding_vector_acts_as_its_token(roots):
    model = load_clip_model("sd15.safetensors", roots)
    enc = model.encoders["l"]
    cat = shared_bpe().encode("cat")[0]
    as_ids = [(BOS, 1.0), (cat, 1.2), (EOS, 1.0)] + [(EOS, 1.0)] * 74
    vector = enc.text.embeddings.token_embedding.weight[cat].detach().clone()
    as_vec = [(BOS, 1.0), (vector, 1.2), (EOS, 1.0)] + [(EOS, 1.0)] * 74
    plain = [(BOS, 1.0), (cat, 1.0), (EOS, 1.0)] + [(EOS, 1.0)] * 74
    wrong_width = [(BOS, 1.0), (torch.zeros(7), 1.0), (cat, 1.0), (EOS, 1.0)] + [(EOS, 1.0)] * 73
    jobs = [EncodeJob({"l": [x]}) for x in (as_ids, as_vec, plain, wrong_width)]
    a, b, c, d = encode_jobs(model.encoders, "sd15", jobs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # A vector of the wrong width is dropped (ComfyUI) and the row padded at the end. (ComfyUI keeps the
    # weights at their original positions then, so only unweighted rows compare equal.)
    torch.testing.assert_close(d[0], c[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(d[1], c[1], rtol=0, atol=1e-6)


def test_clip_skip_validation(roots):
    model = load_clip_model("sd15.safetensors", roots)
    job = EncodeJob({"l": _chunks(SHORT, CLIP_L)}, clip_skip=2)
    with pytest.raises(BadRequest):
        encode_jobs(model.encoders, "sd15", [job])
    # deeper than the model: ComfyUI falls back to the last layer
    (deep,) = encode_jobs(model.encoders, "sd15", [EncodeJob(job.chunks, -24)])
    (last,) = encode_jobs(model.encoders, "sd15", [EncodeJob(job.chunks, None)])
    assert torch.equal(deep[0], last[0])
