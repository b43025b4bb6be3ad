"""GGUF UNets (city96 layout) and the `convert` command: dequantization, loading, error bounds."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from luna_stack.unet.convert import convert
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.step import unet_forward
from luna_stack.weights.precision import dequantize_raw

from .test_unet_support import (
    Q,
    ldm_unet,
    random_blocks,
    reference_step,
    reference_unet,
    step_inputs,
    write_gguf,
)

CPU = torch.device("cpu")
QUANTIZABLE = [Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0, Q.BF16, Q.MXFP4]
RANDOM_BLOCKS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]


def run(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return unet_forward(
            model.module, inputs["x"], inputs["timesteps"], inputs["context"], inputs.get("y")
        )


@pytest.mark.parametrize("qtype", QUANTIZABLE + RANDOM_BLOCKS, ids=lambda q: q.name)
def test_dequantize_matches_the_gguf_package(qtype: gguf.GGMLQuantizationType) -> None:
    """Torch dequantization (GPU-capable; MXFP4 falls back to numpy) == gguf.quants.dequantize."""
    shape = (4, 512)
    if qtype in RANDOM_BLOCKS:
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        raw = random_blocks(qtype, 4 * 512 // block_size, seed=1).reshape(4, -1)
    else:
        raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal(shape).astype(np.float32), qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    got = dequantize_raw(torch.from_numpy(raw).view(torch.uint8), qtype, torch.Size(shape), torch.float32)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _q8(key: str, data: np.ndarray) -> gguf.GGMLQuantizationType:
    return Q.Q8_0


def _q4_k_m(key: str, data: np.ndarray) -> gguf.GGMLQuantizationType:
    # llama.cpp's Q4_K_M: Q4_K, with Q6_K for the more sensitive projections; MXFP4 tests the
    # load-time numpy fallback for a type diffusers has no torch kernel for.
    if key.endswith(("attn1.to_v.weight", "attn2.to_v.weight", "ff.net.2.weight")):
        return Q.Q6_K
    if key.endswith("out_layers.3.weight"):  # resnet conv2
        return Q.MXFP4
    return Q.Q4_K


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_q8_0_gguf_runs_quantized_within_bound(tmp_path: Path, models_dir: Path, family: str) -> None:
    """Q8_0 keeps 8 bits per weight (per-32-block fp16 scale): output within 2% of fp32 (max abs,
    relative to the output's max); weights stay quantized in memory (~1/3.7 of fp32)."""
    sd = ldm_unet(models_dir / "unet" / f"{family}-small-unet.safetensors")
    path = tmp_path / f"{family}-Q8_0.gguf"
    write_gguf(path, sd, {"sd15": "sd1", "sdxl": "sdxl"}[family], _q8)
    model = load_diffusion_model("q8", path, "fp32", CPU)
    assert model.precision == "gguf" and model.quant_types["Q8_0"] > 10
    assert any(parametrize.is_parametrized(m) for m in model.module.modules())
    full = load_diffusion_model("fp32", models_dir / "unet" / f"{family}-small-unet.safetensors", "fp32", CPU)
    assert model.nbytes < full.nbytes / 3
    inputs = step_inputs(full.module, batch=2, seed=7)
    expected = run(full, inputs)
    error = (run(model, inputs) - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.02


def test_k_quant_mix_equals_its_dequantized_weights(tmp_path: Path, models_dir: Path) -> None:
    """A Q4_K_M-style file (Q4_K / Q6_K / MXFP4, reshaped rows, F16/F32 leftovers): the service's output
    equals a diffusers model holding the gguf package's dequantization of the same file."""
    sd = ldm_unet(models_dir / "unet" / "sdxl-small-unet.safetensors")
    path = tmp_path / "sdxl-Q4_K_M.gguf"
    held = write_gguf(path, sd, "sdxl", _q4_k_m)
    model = load_diffusion_model("q4km", path, "fp32", CPU)
    assert {"Q4_K", "Q6_K", "MXFP4"} <= set(model.quant_types)
    reference = reference_unet(held, "sdxl")
    inputs = step_inputs(reference, batch=1, seed=8)
    torch.testing.assert_close(run(model, inputs), reference_step(reference, inputs), rtol=1e-4, atol=1e-4)


# Size ratios vs fp16 on the small fixture: fp8 halves 2-D weights; Q8_0 stores 34 bytes per 32 weights
# (0.53), but the small UNet's many tiny tensors stay F32 as city96 does, so the file is ~0.63.
@pytest.mark.parametrize(("target", "bound", "ratio"), [("fp8", 0.15, 0.55), ("Q8_0", 0.02, 0.7)])
def test_convert_writes_a_loadable_copy_and_reports_error(tmp_path, models_dir, target, bound, ratio) -> None:
    source = models_dir / "checkpoints" / "sd15-small.safetensors"
    out = tmp_path / f"sd15-{target}.{'safetensors' if target == 'fp8' else 'gguf'}"
    report = convert(source, target, out, CPU, latent=8)
    assert Path(report.output) == out and out.stat().st_size == report.output_bytes
    assert report.output_bytes < report.source_fp16_bytes * ratio
    assert 0 < report.relative_error < bound
    model = load_diffusion_model("converted", out, "fp16", CPU)
    assert model.precision == ("fp8" if target == "fp8" else "gguf")
    if target == "fp8":
        assert model.module.down_blocks[0].resnets[0].conv1.weight.dtype == torch.float8_e4m3fn
