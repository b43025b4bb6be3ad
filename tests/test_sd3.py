"""SD3 / SD3.5 MMDiTs (unet/sd3/): config and key map from SAI files, ComfyUI-semantics forward vs diffusers'
own, precisions (fp8, GGUF), and the unet service over real HTTP: steps, batching per shape, LoRA, 4xx."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from luna_stack.client.http import AsyncClient
from luna_stack.devtools.fixtures import _build, _file_layout
from luna_stack.devtools.fixtures_sd3 import VARIANTS, _sd3_part, sd3_config, sd3_file_name, write_sd3
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.unet.arch import Loaded
from luna_stack.unet.convert import convert, write_fp8
from luna_stack.unet.family import build
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.sd3.arch import Sd3Arch, Sd3Model
from luna_stack.unet.sd3.forward import mmdit_forward
from luna_stack.unet.sd3.layout import config_from_keys, diffusers_to_sai, sai_to_diffusers
from luna_stack.weights.checkpoint import load_shapes
from luna_stack.weights.gguf_file import read_gguf
from luna_stack.wire.errors import LunaError

from .conftest import make_settings
from .test_unet_support import Q, write_gguf

CPU = torch.device("cpu")
SD3 = "unet/sd3-small.safetensors"
MODELS = {v: f"unet/{sd3_file_name(v)}" for v in VARIANTS}


def load(path: Path, precision: str = "fp32") -> Sd3Model:
    model = load_diffusion_model(path.name, path, precision, CPU)
    assert isinstance(model, Sd3Model)
    return model


def step_inputs(
    model: Sd3Model, rows: int = 2, height: int = 16, width: int = 16, seed: int = 0, tokens: int = 12
):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, 16, height, width, generator=gen),
        "timesteps": torch.linspace(980.0, 120.0, rows),
        "context": torch.randn(rows, tokens, model.context_dim, generator=gen),
        "y": torch.randn(rows, model.pooled_dim, generator=gen),
    }


def diffusers_step(module: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """diffusers' own SD3Transformer2DModel.forward (patch-divisible latents only)."""
    with torch.inference_mode():
        return module(
            hidden_states=inputs["x"],
            encoder_hidden_states=inputs["context"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            return_dict=False,
            **kwargs,
        )[0]


@pytest.fixture(scope="module")
def refs(models_dir: Path) -> dict[str, Sd3Model]:
    return {v: load(models_dir / path) for v, path in MODELS.items()}


# -- files ------------------------------------------------------------------------------------------


def test_configs_come_from_keys_and_shapes(models_dir: Path) -> None:
    for variant, path in MODELS.items():
        assert config_from_keys(load_shapes(models_dir / path)) == sd3_config(variant, "small")
    # Full-size layouts (meta tensors, no bytes): the released models' configs come back.
    large = config_from_keys(
        _file_layout(_build([_sd3_part(sd3_config("sd3.5-large", "full"), 0, "")]), torch.float16)
    )
    assert (large.num_layers, large.hidden, large.num_attention_heads) == (38, 2432, 38)
    assert (large.pos_embed_max_size, large.joint_attention_dim, large.pooled_projection_dim) == (
        192,
        4096,
        2048,
    )
    assert (
        large.qk_norm == "rms_norm" and large.dual_attention_layers == () and large.variant == "sd3.5-large"
    )
    medium = _file_layout(_build([_sd3_part(sd3_config("sd3.5-medium", "full"), 0, "")]), torch.float16)
    cfg = config_from_keys(medium)
    assert (
        cfg.dual_attention_layers == tuple(range(13)) and cfg.pos_embed_max_size == 384 and cfg.hidden == 1536
    )
    # The last joint block's context half is pre-only: attention inputs, no projection out, no MLP.
    assert "joint_blocks.23.context_block.attn.qkv.weight" in medium
    assert "joint_blocks.23.context_block.attn.proj.weight" not in medium
    assert "joint_blocks.23.context_block.mlp.fc1.weight" not in medium
    assert list(medium["joint_blocks.23.context_block.adaLN_modulation.1.weight"].shape) == [2 * 1536, 1536]


def test_key_map_round_trips_and_swaps_the_adaln_continuous_halves(models_dir: Path) -> None:
    sd = load_file(models_dir / MODELS["sd3.5-medium"])
    cfg = config_from_keys(sd)
    ours = sai_to_diffusers(sd, cfg)
    back = diffusers_to_sai(ours, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    final, d = sd["final_layer.adaLN_modulation.1.weight"], cfg.hidden
    assert torch.equal(ours["norm_out.linear.weight"][:d], final[d:])  # SAI (shift, scale) -> (scale, shift)
    last = sd["joint_blocks.1.context_block.adaLN_modulation.1.bias"]
    assert torch.equal(ours["transformer_blocks.1.norm1_context.linear.bias"][d:], last[:d])
    assert torch.equal(
        ours["transformer_blocks.0.attn2.to_k.weight"],
        sd["joint_blocks.0.x_block.attn2.qkv.weight"][d : 2 * d],
    )


def test_a_checkpoint_section_loads_like_the_standalone_file(tmp_path: Path, refs) -> None:
    path = write_sd3(
        tmp_path / "checkpoints" / "sd3-aio.safetensors",
        "sd3",
        dtype=torch.float32,
        prefix="model.diffusion_model.",
    )
    assert all(k.startswith("model.diffusion_model.") for k in load_shapes(path))
    model = load(path)
    inputs = step_inputs(model, seed=1)
    shape = model.parse_step(inputs, {}).shape
    with torch.inference_mode():
        torch.testing.assert_close(
            model.forward(shape, inputs), refs["sd3"].forward(shape, inputs), rtol=0, atol=0
        )


# -- the forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_forward_equals_diffusers_forward(refs, variant: str) -> None:
    """ComfyUI's walk over diffusers' modules == diffusers' forward where their semantics agree: whole
    patches, and ControlNet residuals on every block but the pre-only last one."""
    model = refs[variant]
    for height, width in ((16, 16), (12, 20)):
        inputs = step_inputs(model, height=height, width=width, seed=2)
        shape = model.parse_step(inputs, {}).shape
        with torch.inference_mode():
            ours = model.forward(shape, inputs)
        torch.testing.assert_close(ours, diffusers_step(model.module, inputs), rtol=1e-5, atol=1e-5)
    tokens = model.tokens(16, 16)
    gen = torch.Generator().manual_seed(3)
    residuals = [torch.randn(2, tokens, model.hidden, generator=gen) for _ in range(2)]
    inputs = step_inputs(model, seed=4)
    step = model.parse_step(inputs | {"control.output.0": residuals[0]}, {})
    with torch.inference_mode():
        ours = model.forward(step.shape, step.tensors)
    expected = diffusers_step(model.module, inputs, block_controlnet_hidden_states=residuals)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - diffusers_step(model.module, inputs)).abs().max() > 1e-2  # the residual matters


def test_odd_latents_pad_to_the_patch_and_crop_back(refs) -> None:
    model = refs["sd3"]
    inputs = step_inputs(model, height=15, width=9, seed=5)
    step = model.parse_step(inputs, {})
    with torch.inference_mode():
        out = model.forward(step.shape, step.tensors)
        padded = torch.nn.functional.pad(inputs["x"], (0, 1, 0, 1), mode="circular")
        full = mmdit_forward(model.module, padded, inputs["timesteps"], inputs["context"], inputs["y"])
    assert out.shape == (2, 16, 15, 9) and torch.isfinite(out).all()
    # The padded input's tokens are the same, so the cropped output equals the padded run's crop.
    torch.testing.assert_close(out, full[:, :, :15, :9], rtol=1e-5, atol=1e-5)


# -- precisions -------------------------------------------------------------------------------------


def _relative_error(model: Sd3Model, reference: Sd3Model, seed: int = 6) -> float:
    inputs = step_inputs(reference, seed=seed)
    shape = reference.parse_step(inputs, {}).shape
    with torch.inference_mode():
        expected = reference.forward(shape, inputs)
        got = model.forward(shape, inputs).float()
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("variant", ["sd3", "sd3.5-large"])
def test_fp8_storage_within_bound(tmp_path: Path, models_dir: Path, refs, variant: str) -> None:
    """e4m3 storage (3 mantissa bits), bf16 compute: within 10% of fp32 (max abs, relative to the
    output's max); an fp8 file is served as fp8 whatever was asked."""
    served = load(models_dir / MODELS[variant], "fp8")
    assert served.precision == "fp8" and served.dtype == torch.bfloat16
    assert 0 < _relative_error(served, refs[variant]) < 0.1
    fp8_file = tmp_path / "sd3-fp8.safetensors"
    write_fp8(load_file(models_dir / MODELS[variant]), fp8_file)
    stored = load(fp8_file, "fp16")
    # e4m3 Linears, adaLN modulations included; the patch embedding and position table stay bf16
    assert stored.precision == "fp8" and stored.nbytes < refs[variant].nbytes / 3
    assert 0 < _relative_error(stored, refs[variant]) < 0.1


def test_q8_0_gguf_stays_quantized_within_bound(tmp_path: Path, models_dir: Path, refs) -> None:
    """city96's layout (`general.architecture` sd3, SAI keys): fused qkv rows split into q, k, v while
    still quantized; within 2% of fp32."""
    sd = load_file(models_dir / MODELS["sd3.5-medium"])
    path = tmp_path / "sd35m-Q8_0.gguf"
    write_gguf(path, sd, "sd3", lambda key, data: Q.Q8_0)
    assert read_gguf(path)[1] == "sd3"
    model = load(path)
    assert model.precision == "gguf" and model.quant_types["Q8_0"] > 10
    to_k = model.module.transformer_blocks[0].attn2.to_k
    assert parametrize.is_parametrized(to_k) and parametrize.is_parametrized(
        model.module.transformer_blocks[1].norm1_context.linear
    )
    assert 0 < _relative_error(model, refs["sd3.5-medium"]) < 0.02


def test_k_quants_equal_their_dequantized_weights(tmp_path: Path, models_dir: Path) -> None:
    """Q4_K / Q6_K rows of 256 cut through a 128-wide fused qkv: those split after dequantizing, the
    output equals a model holding the gguf package's dequantization of the file."""
    sd = load_file(models_dir / MODELS["sd3.5-large"])
    path = tmp_path / "sd35l-Q4_K.gguf"
    held = write_gguf(path, sd, "sd3", lambda key, data: Q.Q6_K if "mlp" in key else Q.Q4_K)
    model = load(path)
    assert {"Q4_K", "Q6_K"} <= set(model.quant_types)
    reference = Sd3Arch().build(held, Loaded("held", path, "fp32", torch.float32, CPU))
    assert _relative_error(model, reference) < 1e-5


# -- the service ------------------------------------------------------------------------------------


@pytest.fixture
def service(models_dir, start_service, redis_url):
    settings = make_settings(models_dir, LUNA_REDIS_URL=redis_url, LUNA_UNET_MAX_DELAY_MS="100")
    return start_service(build, settings)


async def test_service_step_equals_diffusers_in_process(service, refs) -> None:
    async with AsyncClient("unet", url=service.url) as client:
        for variant, name in MODELS.items():
            inputs = step_inputs(refs[variant], seed=10)
            out, params = await client.call("step", inputs, {"model": name})
            assert params["family"] == "sd3"
            torch.testing.assert_close(
                out["out"], diffusers_step(refs[variant].module, inputs), rtol=1e-5, atol=1e-5
            )
        # ControlNet residuals: one row broadcast to both (ComfyUI's `x += add`), the last block included.
        model = refs["sd3"]
        inputs = step_inputs(model, height=10, width=14, seed=11)
        gen = torch.Generator().manual_seed(12)
        control = {
            f"control.output.{i}": torch.randn(1, model.tokens(10, 14), model.hidden, generator=gen)
            for i in (0, 1)
        }
        out, _ = await client.call("step", inputs | control, {"model": SD3})
        with torch.inference_mode():
            residuals = {i: control[f"control.output.{i}"].expand(2, -1, -1) for i in (0, 1)}
            expected = mmdit_forward(
                model.module, inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"], residuals
            )
        torch.testing.assert_close(out["out"], expected, rtol=1e-5, atol=1e-5)
        half = {k: v.half() if k != "timesteps" else v for k, v in inputs.items()}
        out, _ = await client.call("step", half, {"model": SD3})
        assert out["out"].dtype == torch.float16 and out["out"].shape == (2, 16, 10, 14)
        listing = await client.get_json("/v1/unet/models")
        described = {m["name"]: m for m in listing["loaded"]}[MODELS["sd3.5-medium"]]
        assert described["family"] == "sd3" and described["dual_attention_blocks"] == [0]
        assert described["max_image_size"] == 512 and described["qk_norm"] == "rms_norm"


async def test_mixed_resolutions_batch_only_per_shape(service, refs) -> None:
    model = refs["sd3"]
    sizes = [(16, 16), (12, 20), (16, 16), (12, 20), (16, 16), (16, 16)]
    requests = [step_inputs(model, height=h, width=w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    clients = [AsyncClient("unet", url=service.url, name=f"c{i}") for i in range(len(requests))]
    try:
        alone = [
            (await c.call("step", r, {"model": SD3}))[0]["out"]
            for c, r in zip(clients, requests, strict=True)
        ]
        replies = await asyncio.gather(
            *(c.call("step", r, {"model": SD3}) for c, r in zip(clients, requests, strict=True))
        )
    finally:
        for c in clients:
            await c.close()
    rows = [params["batch_rows"] for _, params in replies]
    assert max(rows[i] for i in (0, 2, 4, 5)) > 2  # 16x16 steps merged
    assert all(rows[i] <= 4 for i in (1, 3))  # 12x20 steps only with each other
    for (out, _), expected in zip(replies, alone, strict=True):
        torch.testing.assert_close(out["out"], expected, rtol=1e-5, atol=1e-5)


async def test_peft_lora_equals_a_merged_copy(service, models_dir: Path, refs) -> None:
    """diffusers/PEFT names (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`) bind to the
    module's own names through the generic side paths."""
    model = refs["sd3.5-large"]
    peft = models_dir / "loras" / "sd35-unet-peft.safetensors"
    truth = write_lora(peft, model.module, "unet", "peft", rank=4, targets="all", seed=30)  # alpha = rank
    tensors = {k.replace("unet.", "transformer.", 1): v for k, v in load_file(peft).items()}
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    name = "sd35-transformer-peft.safetensors"
    save_file(tensors, models_dir / "loras" / name)
    peft.unlink()
    merged = copy.deepcopy(model.module)
    modules = dict(merged.named_modules())
    for module, f in truth.items():
        modules[module].weight.data += (
            0.7 * f.scale * (f.up.flatten(1) @ f.down.flatten(1)).reshape(modules[module].weight.shape)
        )
    inputs = step_inputs(model, seed=31)
    async with AsyncClient("unet", url=service.url) as client:
        out, _ = await client.call(
            "step", inputs, {"model": MODELS["sd3.5-large"], "lora": [{"name": name, "strength": 0.7}]}
        )
    expected = diffusers_step(merged, inputs)
    assert (expected - diffusers_step(model.module, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(out["out"], expected, rtol=1e-4, atol=1e-4)


async def test_bad_input_is_4xx(service, refs) -> None:
    model = refs["sd3"]
    good = step_inputs(model, seed=40)
    tokens = model.tokens(16, 16)
    flux_like = good | {"y": torch.randn(2, 768), "guidance": torch.full((2,), 3.5)}
    bad = {
        "wrong latent channels": good | {"x": torch.randn(2, 4, 16, 16)},
        "wrong context width": good | {"context": torch.randn(2, 12, 64)},
        "missing y": {k: v for k, v in good.items() if k != "y"},
        "y of the wrong width": good | {"y": torch.randn(2, 768)},
        "a Flux request": flux_like,
        "guidance": good | {"guidance": torch.full((2,), 3.5)},
        "latent beyond the position table": step_inputs(model, height=66, width=16),
        "control of another kind": good | {"control.input.0": torch.randn(2, tokens, model.hidden)},
        "control of the wrong shape": good | {"control.output.0": torch.randn(2, tokens + 1, model.hidden)},
        "control past the last block": good | {"control.output.2": torch.randn(2, tokens, model.hidden)},
        "too many context tokens": good | {"context": torch.randn(2, 2049, model.context_dim)},
    }
    async with AsyncClient("unet", url=service.url) as client:
        for what, tensors in bad.items():
            with pytest.raises(LunaError) as info:
                await client.call("step", tensors, {"model": SD3})
            assert 400 <= info.value.status < 500, f"{what}: {info.value.status} {info.value}"
            if what == "latent beyond the position table":
                assert "512×512" in str(info.value) or "512×512" in str(info.value.hint)
        out, _ = await client.call("step", good, {"model": SD3})
        assert out["out"].shape == good["x"].shape


@pytest.mark.parametrize(("target", "bound"), [("fp8", 0.1), ("Q8_0", 0.02)])
def test_convert_writes_sd3_copies(tmp_path: Path, models_dir: Path, target: str, bound: float) -> None:
    """`luna-stack convert` on an SAI file: SAI keys kept, GGUF `general.architecture` sd3."""
    out = tmp_path / f"sd3-{target}.{'safetensors' if target == 'fp8' else 'gguf'}"
    report = convert(models_dir / SD3, target, out, CPU, latent=16)
    assert 0 < report.relative_error < bound and report.output_bytes < report.source_fp16_bytes
    model = load(out)
    assert model.precision == ("fp8" if target == "fp8" else "gguf")
    if target != "fp8":
        sd, arch = read_gguf(out)
        assert arch == "sd3" and "joint_blocks.0.x_block.attn.qkv.weight" in sd


async def test_sai_named_lora_with_fused_qkv_equals_a_merged_copy(service, models_dir: Path) -> None:
    """kohya names over SAI paths (`lora_unet_joint_blocks_0_x_block_attn_qkv`, one factor pair for the
    fused q/k/v) and `diffusion_model.<SAI path>` names, both of which ComfyUI's SD3 key map reads: equal
    to the LoRA merged into the SAI weights before loading (so fused rows and swapped halves must land
    where the key map puts them)."""
    name = MODELS["sd3.5-medium"]
    sai = load_file(models_dir / name)
    targets = [
        "joint_blocks.0.x_block.attn.qkv",
        "joint_blocks.0.x_block.attn2.qkv",
        "joint_blocks.1.context_block.attn.qkv",
        "joint_blocks.1.context_block.adaLN_modulation.1",  # pre-only: halves swapped
        "final_layer.adaLN_modulation.1",  # halves swapped
        "joint_blocks.0.x_block.mlp.fc1",
    ]
    gen = torch.Generator().manual_seed(50)
    rank, alpha, strength = 4, 2.0, 0.9
    tensors, merged = {}, dict(sai)
    for i, target in enumerate(targets):
        weight = sai[f"{target}.weight"]
        down = torch.randn(rank, weight.shape[1], generator=gen) / weight.shape[1] ** 0.5
        up = torch.randn(weight.shape[0], rank, generator=gen) * 0.5
        if i % 2 == 0:
            base = "lora_unet_" + target.replace(".", "_")
            tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
        else:
            base = f"diffusion_model.{target}"
            tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
        merged[f"{target}.weight"] = weight + strength * alpha / rank * up @ down
    lora = "sd35-sai-kohya.safetensors"
    save_file(tensors, models_dir / "loras" / lora)
    reference = Sd3Arch().build(merged, Loaded("merged", models_dir / name, "fp32", torch.float32, CPU))
    base_model = load(models_dir / name)
    inputs = step_inputs(base_model, seed=51)
    async with AsyncClient("unet", url=service.url) as client:
        out, _ = await client.call(
            "step", inputs, {"model": name, "lora": [{"name": lora, "strength": strength}]}
        )
    expected = diffusers_step(reference.module, inputs)
    assert (expected - diffusers_step(base_model.module, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(out["out"], expected, rtol=1e-4, atol=1e-4)
