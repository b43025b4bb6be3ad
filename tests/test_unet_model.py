"""The model side of the UNet service: loading user files, the ComfyUI-shaped step, control, precisions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from luna_stack.devtools.fixtures import unet_config
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.sd_unet import SdUnet
from luna_stack.unet.step import BlockResiduals, control_from_wire, input_block_shapes, unet_forward
from luna_stack.wire.errors import BadRequest, ModelLoadError

from .test_unet_support import ldm_unet, reference_step, reference_unet, step_inputs

CPU = torch.device("cpu")


def run(
    model: SdUnet, inputs: dict[str, torch.Tensor], control: BlockResiduals | None = None
) -> torch.Tensor:
    dt = model.dtype
    cast = {k: v.to(dt) if k != "timesteps" else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = unet_forward(
            model.module, cast["x"], cast["timesteps"], cast["context"], cast.get("y"), control
        )
    return out.float()


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> dict[tuple[str, str], SdUnet]:
    files = {
        (fam, kind): models_dir / folder / f"{fam}-small{suffix}.safetensors"
        for fam in ("sd15", "sdxl")
        for kind, folder, suffix in (("checkpoint", "checkpoints", ""), ("unet", "unet", "-unet"))
    }
    return {key: load_diffusion_model(f"{key[0]}-{key[1]}", path, "fp32", CPU) for key, path in files.items()}


@pytest.fixture(scope="module")
def references(models_dir: Path) -> dict[str, torch.nn.Module]:
    return {
        fam: reference_unet(ldm_unet(models_dir / "checkpoints" / f"{fam}-small.safetensors"), fam)
        for fam in ("sd15", "sdxl")
    }


@pytest.mark.parametrize("kind", ["checkpoint", "unet"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_step_equals_diffusers_model(loaded, references, family: str, kind: str) -> None:
    model = loaded[(family, kind)]
    assert model.family == family
    assert {k: model.config[k] for k in unet_config(family, "small")} == unet_config(family, "small")
    ref = references[family]
    inputs = step_inputs(ref, batch=2, height=8, width=12, seed=1)
    assert ("y" in inputs) == (family == "sdxl")
    expected = reference_step(ref, inputs)
    assert torch.equal(run(model, inputs), expected)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_residuals_match_diffusers(loaded, references, family: str) -> None:
    """A ControlNet's output list (ComfyUI control['output'], input-block order) + middle == diffusers'
    down_block_additional_residuals / mid_block_additional_residual."""
    model, ref = loaded[(family, "unet")], references[family]
    inputs = step_inputs(ref, batch=2, height=10, width=6, seed=2)  # odd sizes: upsample to the skip
    gen = torch.Generator().manual_seed(3)
    shapes = input_block_shapes(model.module, 10, 6)
    down = [torch.randn(2, *s, generator=gen) for s in shapes]
    mid = torch.randn(2, *shapes[-1], generator=gen)
    wire = {f"control.output.{i}": t for i, t in enumerate(down)} | {"control.middle.0": mid}
    control = control_from_wire(wire, None, len(shapes))
    expected = reference_step(
        ref, inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    assert torch.equal(run(model, inputs, control), expected)
    assert not torch.allclose(run(model, inputs), expected)  # the residuals changed the output


def test_t2i_adapter_input_residuals_match_diffusers(loaded, references) -> None:
    """ComfyUI's reversed `input` list with None gaps lands where diffusers' T2I-Adapter residuals do:
    after each level's last resnet/attention (SD1.5 small: input blocks 2 and 5)."""
    model, ref = loaded[("sd15", "unet")], references["sd15"]
    inputs = step_inputs(ref, batch=1, seed=4)
    shapes = input_block_shapes(model.module, 8, 8)
    assert len(shapes) == 6
    gen = torch.Generator().manual_seed(5)
    r2, r5 = (torch.randn(1, *shapes[i], generator=gen) for i in (2, 5))
    # ComfyUI list: reversed block order, popped from the end -> index 5 - block.
    control = control_from_wire({"control.input.3": r2, "control.input.0": r5}, {"input": 6}, len(shapes))
    assert set(control.input) == {2, 5}
    expected = reference_step(ref, inputs, down_intrablock_additional_residuals=[r2.clone(), r5.clone()])
    assert torch.allclose(run(model, inputs, control), expected, atol=1e-6)


def test_control_mapping_replays_comfyui_pops() -> None:
    """Simulate apply_control: each block pops the list's last entry (None = nothing added)."""
    n_blocks = 9
    lists = {
        "input": [None, "a", None, "b", None, None, "c", None, None],
        "output": ["s0", "s1", "s2", None, "s4", "s5", "s6"],  # shorter than the blocks: early pops only
        "middle": [None, "m"],
    }
    popped: dict[str, dict[int, str]] = {"input": {}, "output": {}}
    work = {k: list(v) for k, v in lists.items()}
    for block in range(n_blocks):
        if work["input"] and (entry := work["input"].pop()) is not None:
            popped["input"][block] = entry
    middle = work["middle"].pop()
    for j in range(n_blocks):
        skip_of = n_blocks - 1 - j
        if work["output"] and (entry := work["output"].pop()) is not None:
            popped["output"][skip_of] = entry
    tokens = {
        name: torch.tensor(float(i))
        for i, name in enumerate(["a", "b", "c", "s0", "s1", "s2", "s4", "s5", "s6", "m"])
    }
    wire = {
        f"control.{kind}.{i}": tokens[v]
        for kind, entries in lists.items()
        for i, v in enumerate(entries)
        if v is not None
    }
    control = control_from_wire(wire, {k: len(v) for k, v in lists.items()}, n_blocks)
    assert {b: t.item() for b, t in control.input.items()} == {
        b: tokens[v].item() for b, v in popped["input"].items()
    }
    assert {b: t.item() for b, t in control.output.items()} == {
        b: tokens[v].item() for b, v in popped["output"].items()
    }
    assert control.middle.item() == tokens[middle].item()


def test_control_names_and_lengths_are_checked() -> None:
    with pytest.raises(BadRequest):
        control_from_wire({"control.sideways.0": torch.zeros(1)}, None, 4)
    with pytest.raises(BadRequest):
        control_from_wire({"control.output.5": torch.zeros(1)}, {"output": 3}, 9)


def test_weights_are_frozen_in_eval_mode(loaded) -> None:
    unet = loaded[("sdxl", "checkpoint")].module
    assert not unet.training
    assert all(not p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize(
    ("precision", "stored", "bound"),
    [("fp16", torch.float16, 0.005), ("bf16", torch.bfloat16, 0.03), ("fp8", torch.float8_e4m3fn, 0.15)],
)
def test_precisions_store_weights_and_stay_close_to_fp32(
    models_dir, references, precision, stored, bound
) -> None:
    """Bound: max |out - out_fp32| / max |out_fp32| (fp8 e4m3 keeps 3 mantissa bits: ~6% per weight)."""
    path = models_dir / "unet" / "sd15-small-unet.safetensors"
    model = load_diffusion_model("sd15", path, precision, CPU)
    conv = model.module.down_blocks[0].resnets[0].conv1.weight
    assert conv.dtype == stored
    full = load_diffusion_model("sd15", path, "fp32", CPU)
    assert model.nbytes < full.nbytes * (0.3 if precision == "fp8" else 0.55)
    inputs = step_inputs(references["sd15"], batch=1, seed=6)
    expected = run(full, inputs)
    error = (run(model, inputs) - expected).abs().max() / expected.abs().max()
    assert error < bound, f"{precision}: relative error {error:.4f}"
    assert error > 0


def test_unusable_files_are_load_errors(tmp_path: Path, models_dir: Path) -> None:
    vae_only = models_dir / "vae" / "sd15-small-vae.safetensors"
    with pytest.raises(ModelLoadError):
        load_diffusion_model("vae", vae_only, "fp32", CPU)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((models_dir / "unet" / "sd15-small-unet.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelLoadError):
        load_diffusion_model("corrupt", corrupt, "fp32", CPU)
    diffusers_layout = tmp_path / "diffusers.safetensors"
    save_file(
        {
            k: v.contiguous()
            for k, v in reference_unet(ldm_unet(models_dir / "unet" / "sd15-small-unet.safetensors"), "sd15")
            .state_dict()
            .items()
        },
        str(diffusers_layout),
    )
    with pytest.raises(ModelLoadError, match="diffusers-layout"):
        load_diffusion_model("diffusers", diffusers_layout, "fp32", CPU)
