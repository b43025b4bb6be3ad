"""The Flux.1 plug-in on the CPU: config from keys, the BFL <-> diffusers map, our forward (ComfyUI's
semantics) against diffusers' own, control residuals, fp8 / GGUF storage and their error, bad inputs."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from luna_stack.devtools.fixtures import _build, _file_layout, _vae_part, _write
from luna_stack.devtools.fixtures_flux import flux_config, flux_part, write_flux_lora, write_flux_small
from luna_stack.gpu.graph_config import GraphConfig
from luna_stack.lora import attach_side_paths
from luna_stack.lora.cache import LoraCache
from luna_stack.lora.resolve import adaptable_modules
from luna_stack.lora.side import row_groups
from luna_stack.unet import convert
from luna_stack.unet.flux.arch import FluxModel, FluxShape, build_module
from luna_stack.unet.flux.forward import patchify, position_ids, unpatchify
from luna_stack.unet.flux.layout import (
    FLUX1_DEV,
    FLUX1_SCHNELL,
    bfl_to_diffusers,
    diffusers_to_bfl,
    infer_config,
    is_flux,
    module_map,
    take_rows,
)
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.step_runner import build_runner
from luna_stack.weights.precision import QuantizedWeight
from luna_stack.wire.errors import BadRequest, LunaError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_flux_small(tmp_path_factory.mktemp("flux"))


def step_inputs(model: FluxModel, rows: int = 2, h: int = 8, w: int = 10, seed: int = 0, tokens: int = 7):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    inputs = {
        "x": torch.randn(rows, 16, h, w, generator=gen),
        "timesteps": torch.rand(rows, generator=gen),
        "context": torch.randn(rows, tokens, cfg.context_dim, generator=gen),
        "y": torch.randn(rows, cfg.pooled_dim, generator=gen),
    }
    if cfg.guidance:
        inputs["guidance"] = torch.rand(rows, generator=gen) * 5
    return inputs


def run(model: FluxModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    step = model.parse_step(inputs, {})
    with torch.inference_mode():
        return model.forward(step.shape, step.tensors).float()


def flux_loras(model: FluxModel, folder: Path) -> tuple:
    """a: kohya over every BFL Linear (fused qkv / linear1 too), b: diffusers-PEFT over every Linear."""
    cache = LoraCache(1 << 30, model.device, model.dtype)
    modules = adaptable_modules(model.module)
    bfl = {
        name: (
            max((b for p in parts for _, b in p.rows), default=modules[parts[0].module].out_features),
            modules[parts[0].module].in_features,
        )
        for name, parts in module_map(model.cfg).items()
    }
    diffusers = {n: (m.out_features, m.in_features) for n, m in modules.items()}
    write_flux_lora(folder / "a.safetensors", bfl, "kohya", rank=4, seed=1)
    write_flux_lora(folder / "b.safetensors", diffusers, "peft", rank=8, seed=2)
    return tuple(cache.resolve(folder / f"{n}.safetensors", model.module, "unet") for n in "ab")


def flux_requests(model: FluxModel, shape: FluxShape, stacks: list, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for i, stack in enumerate(stacks):
        inputs = step_inputs(
            model, rows=1, h=shape.height, w=shape.width, tokens=shape.context, seed=seed + i
        )
        for slot, tokens in shape.control:
            inputs[f"control.{slot}"] = torch.randn(1, tokens, model.cfg.hidden, generator=gen)
        requests.append((model.parse_step(inputs, {}), tuple(stack)))
    return requests


def eager_flux(model: FluxModel, shape: FluxShape, requests: list) -> torch.Tensor:
    parts = {n: torch.cat([r[0].tensors[n] for r in requests]) for n in requests[0][0].tensors}
    plan = row_groups([(1, r[1]) for r in requests])
    with torch.inference_mode(), attach_side_paths(model.module).plan(plan):
        return model.forward(shape, parts)


def test_runner_buffers_and_lora_bank_equal_eager(files, tmp_path) -> None:
    """The step runner with graphs on (on the CPU: static buffers, padded buckets, the LoRA bank, not
    captured) equals the eager forward with the stacks through the row plan."""
    model = load_diffusion_model("f", files["flux_dev"], "fp32", CPU)
    a, b = flux_loras(model, tmp_path)
    runner = build_runner(model, GraphConfig(True, (1, 2, 4), "first_use", 4, 2, 8))
    shape = FluxShape(10, 12, 7, (("input.1", 30), ("output.0", 20)))
    cycle = [((a, 0.8),), (), ((a, 0.5), (b, -1.0)), ((b, 1.2),)]
    for rows in (1, 3, 4):
        requests = flux_requests(model, shape, [cycle[i % 4] for i in range(rows)], 10 * rows)
        parts = {n: [r[0].tensors[n] for r in requests] for n in requests[0][0].tensors}
        out = runner.run(shape, parts, [(1, r[1]) for r in requests]).clone()
        torch.testing.assert_close(out, eager_flux(model, shape, requests), rtol=1e-5, atol=1e-5)
    moved = eager_flux(model, shape, [(r[0], ()) for r in requests])
    assert (moved[0] - out[0]).abs().max() > 1e-2  # row 0's adapter is really applied
    assert runner.eager == {}


def test_configs_come_from_keys_and_shapes(files) -> None:
    for variant in ("dev", "schnell"):
        shapes = {k: v.shape for k, v in load_file(files[f"flux_{variant}"]).items()}
        assert is_flux(shapes)
        assert infer_config(shapes) == flux_config(variant)
    # Full-size Flux.1 (meta tensors: the layout a real flux1-dev.safetensors has, never materialised).
    for variant, expected in (("dev", FLUX1_DEV), ("schnell", FLUX1_SCHNELL)):
        layout = _file_layout(_build([flux_part(variant, "full", 0)]), torch.bfloat16)
        shapes = {k: v.shape for k, v in layout.items()}
        assert infer_config(shapes) == expected
        assert expected.axes_dim == (16, 56, 56) and expected.heads == 24
        assert shapes["double_blocks.0.img_attn.qkv.weight"] == (9216, 3072)
        assert shapes["single_blocks.37.linear1.weight"] == (21504, 3072)
        assert ("guidance_in.in_layer.weight" in shapes) == (variant == "dev")
        assert len(shapes) == (780 if variant == "dev" else 776)


def test_all_in_one_checkpoints_load_their_diffusion_model(files, tmp_path) -> None:
    """A checkpoints/ file with the DiT under `model.diffusion_model.` beside a VAE loads the same
    network as the standalone file."""
    path = _write(
        tmp_path / "flux-dev-aio.safetensors",
        [flux_part("dev", "small", 0, "model.diffusion_model."), _vae_part("small", 0, "vae.")],
        torch.bfloat16,
        {},
    )
    aio = load_diffusion_model("aio", path, "fp32", CPU)
    alone = load_diffusion_model("alone", files["flux_dev"], "fp32", CPU)
    assert aio.family == "flux" and aio.cfg == alone.cfg
    inputs = step_inputs(alone, seed=9)
    assert torch.equal(run(aio, inputs), run(alone, inputs))


def test_the_bfl_map_round_trips_and_swaps_the_final_modulation(files) -> None:
    sd = load_file(files["flux_dev"])
    config = infer_config({k: v.shape for k, v in sd.items()})
    converted = bfl_to_diffusers(sd, config)
    back = diffusers_to_bfl(converted.state_dict, config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    h = config.hidden
    final = sd["final_layer.adaLN_modulation.1.weight"]  # BFL: (shift, scale)
    norm_out = converted.state_dict["norm_out.linear.weight"]  # diffusers: (scale, shift)
    assert torch.equal(norm_out[:h], final[h:]) and torch.equal(norm_out[h:], final[:h])
    qkv = sd["single_blocks.1.linear1.weight"]
    assert torch.equal(converted.state_dict["single_transformer_blocks.1.proj_mlp.weight"], qkv[3 * h :])
    assert torch.equal(converted.state_dict["single_transformer_blocks.1.attn.to_k.weight"], qkv[h : 2 * h])


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_our_forward_equals_diffusers_own_forward(files, variant) -> None:
    """fp32, bitwise. (In bf16 diffusers' forward rounds the sigma to bf16 before x1000; ComfyUI and we
    embed it in fp32, so only fp32 compares exactly.)"""
    model = load_diffusion_model("f", files[f"flux_{variant}"], "fp32", CPU)
    inputs = step_inputs(model, h=8, w=12, seed=1)
    ids = position_ids(8, 12, 7, CPU)
    with torch.inference_mode():
        theirs = model.module(
            hidden_states=patchify(inputs["x"]),
            encoder_hidden_states=inputs["context"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=ids[7:],
            txt_ids=ids[:7],
            guidance=inputs.get("guidance"),
            return_dict=False,
        )[0]
    assert torch.equal(run(model, inputs), unpatchify(theirs, 8, 12))


def test_odd_latents_are_padded_circularly_and_cropped(files) -> None:
    model = load_diffusion_model("f", files["flux_dev"], "fp32", CPU)
    inputs = step_inputs(model, h=9, w=11, seed=2)
    padded = dict(inputs, x=F.pad(inputs["x"], (0, 1, 0, 1), mode="circular"))
    out = run(model, inputs)
    assert out.shape == (2, 16, 9, 11)
    assert torch.equal(out, run(model, padded)[:, :, :9, :11])


def test_control_residuals_land_after_their_blocks(files) -> None:
    """control.input.i after double block i, control.output.i after single block i, on the first n image
    tokens: checked against forward hooks on diffusers' blocks that add the same tensors."""
    model = load_diffusion_model("f", files["flux_dev"], "fp32", CPU)
    inputs = step_inputs(model, h=8, w=8, seed=3)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 16, 64, generator=gen), torch.randn(1, 10, 64, generator=gen)  # b: 1 row, 10 tokens

    def adding(t: torch.Tensor):
        def hook(_module, _args, output):
            txt, img = output
            img = img.clone()
            img[:, : t.shape[1]] += t
            return txt, img

        return hook

    handles = [
        model.module.transformer_blocks[1].register_forward_hook(adding(a)),
        model.module.single_transformer_blocks[0].register_forward_hook(adding(b)),
    ]
    try:
        expected = run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    out = run(model, inputs | {"control.input.1": a, "control.output.0": b, "control.output.9": a})
    assert torch.equal(out, expected) and not torch.equal(out, run(model, inputs))


@pytest.mark.parametrize(
    ("precision", "dtype", "bound"), [("bf16", torch.bfloat16, 0.03), ("fp16", torch.float16, 0.005)]
)
def test_half_precisions_stay_close_to_fp32(files, precision, dtype, bound) -> None:
    model = load_diffusion_model("h", files["flux_dev"], precision, CPU)
    assert model.dtype == dtype and model.module.proj_out.weight.dtype == dtype
    reference = load_diffusion_model("f", files["flux_dev"], "fp32", CPU)
    assert model.nbytes * 2 == reference.nbytes
    inputs = step_inputs(model, seed=8)
    expected, got = run(reference, inputs), run(model, inputs)
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert 0 < rel < bound, rel


def test_fp8_files_stay_fp8_resident_and_stay_close(files, tmp_path) -> None:
    source = files["flux_dev"]
    out, _ = convert.write_copy(source, "fp8", tmp_path / "flux-fp8.safetensors")
    assert load_file(out)["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    model = load_diffusion_model("f8", out, "fp32", CPU)
    assert (model.precision, model.dtype) == ("fp8", torch.bfloat16)
    for module in (
        model.module.transformer_blocks[0].attn.to_q,
        model.module.transformer_blocks[1].norm1.linear,
    ):
        assert module.weight.dtype == torch.float8_e4m3fn  # modulations too, as ComfyUI keeps them
    assert model.module.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    reference = load_diffusion_model("bf", source, "bf16", CPU)
    assert model.nbytes < 0.55 * reference.nbytes
    inputs = step_inputs(model, seed=5)
    expected, got = run(reference, inputs), run(model, inputs)
    rel = float((got - expected).abs().max() / expected.abs().max())
    print(f"fp8: relative error {rel:.2e}")
    assert 0 < rel < 0.1, rel  # e4m3 keeps 3 mantissa bits


# max |error| / max |output| vs the source in fp32; BF16 of a bf16 file is exact.
GGUF_BOUNDS = {"Q8_0": 0.01, "Q5_1": 0.05, "Q5_0": 0.06, "Q4_1": 0.1, "Q4_0": 0.12, "BF16": 0.0}


@pytest.mark.parametrize("target", list(GGUF_BOUNDS))
def test_gguf_copies_stay_quantized_and_within_bounds(files, tmp_path, target) -> None:
    out, _ = convert.write_copy(files["flux_dev"], target, tmp_path / f"flux-{target}.gguf")
    reader = gguf.GGUFReader(str(out))
    arch = reader.get_field("general.architecture")
    assert str(arch.parts[arch.data[-1]], encoding="utf-8") == "flux"
    assert "double_blocks.0.img_attn.qkv.weight" in {t.name for t in reader.tensors}
    model = load_diffusion_model("g", out, "fp32", CPU)
    assert model.precision == "gguf" and model.quant_types[target] > 0
    # Fused qkv / linear1 split by rows into to_q / to_k / to_v / proj_mlp, still quantized.
    for module in (
        model.module.transformer_blocks[0].attn.to_k,
        model.module.single_transformer_blocks[1].proj_mlp,
    ):
        assert parametrize.is_parametrized(module, "weight")
        assert module.parametrizations.weight.original.dtype == torch.uint8
    reference = load_diffusion_model("r", files["flux_dev"], "fp32", CPU)
    inputs = step_inputs(model, seed=6)
    expected, got = run(reference, inputs), run(model, inputs)
    rel = float((got - expected).abs().max() / expected.abs().max())
    print(f"{target}: relative error {rel:.2e}")
    assert rel <= GGUF_BOUNDS[target] and (rel > 0) == (target != "BF16"), rel


def test_gguf_rows_off_block_boundaries_are_dequantized() -> None:
    values = torch.randn(6, 48)  # rows of 48 values: Q8_0 blocks of 32 straddle rows
    raw = gguf.quants.quantize(values.reshape(-1, 32).numpy(), gguf.GGMLQuantizationType.Q8_0)
    weight = QuantizedWeight(
        torch.from_numpy(raw).view(torch.uint8), gguf.GGMLQuantizationType.Q8_0, torch.Size((6, 48))
    )
    taken, expanded = take_rows(weight, ((2, 4),))
    assert expanded and torch.equal(taken, weight.dequantize(torch.float32)[2:4])
    aligned = QuantizedWeight(weight.raw, weight.qtype, torch.Size((9, 32)))
    kept, expanded = take_rows(aligned, ((3, 5), (0, 1)))
    assert not expanded and isinstance(kept, QuantizedWeight)
    full = aligned.dequantize(torch.float32)
    assert torch.equal(kept.dequantize(torch.float32), torch.cat([full[3:5], full[0:1]]))


def test_convert_reports_flux_errors(files, tmp_path) -> None:
    report = convert.convert(files["flux_schnell"], "Q8_0", tmp_path / "s.gguf", CPU, latent=16)
    assert report.ratio < 0.7 and 0 < report.relative_error < 0.02


BAD = {
    "wrong context width": ({"context": torch.zeros(2, 7, 33)}, "context width"),
    "missing y": ({"y": None}, "needs `y`"),
    "SD-style y": ({"y": torch.zeros(2, 2816)}, "SDXL"),
    "missing guidance on dev": ({"guidance": None}, "guidance"),
    "timesteps of another shape": ({"timesteps": torch.zeros(2, 1)}, "timesteps"),
    "timesteps for other rows": ({"timesteps": torch.zeros(3)}, "timesteps"),
    "too many tokens": ({"context": torch.zeros(2, 1025, 32)}, "tokens"),
    "control of another width": ({"control.input.0": torch.zeros(2, 20, 63)}, "control"),
    "control of too many tokens": ({"control.output.0": torch.zeros(2, 21, 64)}, "control"),
    "middle control": ({"control.middle.0": torch.zeros(2, 20, 64)}, "control"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_steps_are_4xx(files, case) -> None:
    model = load_diffusion_model("f", files["flux_dev"], "fp32", CPU)
    change, words = BAD[case]
    inputs = step_inputs(model, h=8, w=10) | {k: v for k, v in change.items() if v is not None}
    for k in [k for k, v in change.items() if v is None]:
        del inputs[k]
    with pytest.raises(BadRequest, match=words) as err:
        model.parse_step(inputs, {})
    assert isinstance(err.value, LunaError) and 400 <= err.value.status < 500


def test_guidance_to_schnell_is_4xx(files) -> None:
    model = load_diffusion_model("s", files["flux_schnell"], "fp32", CPU)
    inputs = step_inputs(model) | {"guidance": torch.full((2,), 3.5)}
    with pytest.raises(BadRequest, match="no guidance embedding"):
        model.parse_step(inputs, {})


def test_build_module_rejects_other_variants(files) -> None:
    sd = load_file(files["flux_dev"])
    del sd["double_blocks.1.txt_mlp.2.bias"]
    with pytest.raises(LunaError, match="do not fit"):
        build_module(sd, "fp32", torch.float32, CPU)
