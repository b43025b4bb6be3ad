"""The LoRA side path against a privately merged copy of the model (W' = W + s·(alpha/r)·B@A), on small
real diffusers UNets and transformers CLIP text models, for every file layout; mixed batches; no pollution.

Tolerance: fp32, atol = rtol = 1e-5 (side path and merged weights differ only in summation order).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from luna_stack.devtools.lora_fixtures import tiny_clip, tiny_unet, write_lora
from luna_stack.lora import (
    LoraFactors,
    LoraSlots,
    ResolvedLora,
    attach_side_paths,
    load_lora_bytes,
    parse_lora,
    resolve,
    row_groups,
)
from luna_stack.wire.errors import BadRequest

TOL = {"atol": 1e-5, "rtol": 1e-5}
Truth = dict[str, LoraFactors]


Inputs = dict[str, torch.Tensor]


@dataclass
class Hooked:
    model: nn.Module  # side paths attached
    pristine: nn.Module  # a copy taken before attaching: the reference for merges and bitwise checks
    slots: LoraSlots
    component: str
    inputs: Callable[[int], Inputs]  # batch size -> fixed random inputs, batch dim first
    forward: Callable[[nn.Module, Inputs], torch.Tensor]

    def run(self, model: nn.Module, batch: int) -> torch.Tensor:
        return self.forward(model, self.inputs(batch))


def _unet_inputs(sdxl: bool) -> Callable[[int], Inputs]:
    def inputs(batch: int) -> Inputs:
        g = torch.Generator().manual_seed(1)
        out = {
            "sample": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.linspace(50, 900, batch),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),
        }
        if sdxl:
            out["class_labels"] = torch.randn(batch, 48, generator=g)
        return out

    return inputs


def _unet_forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def _clip_inputs(batch: int) -> Inputs:
    return {"input_ids": torch.randint(0, 998, (batch, 12), generator=torch.Generator().manual_seed(2))}


def _clip_forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    parts = [out.last_hidden_state.flatten(1)]
    if getattr(out, "text_embeds", None) is not None:
        parts.append(out.text_embeds)
    return torch.cat(parts, dim=1)


_BUILDERS = {
    "sdxl": (lambda: tiny_unet(sdxl=True), "unet", _unet_inputs(True), _unet_forward),
    "sd15": (lambda: tiny_unet(sdxl=False), "unet", _unet_inputs(False), _unet_forward),
    "clip_l": (lambda: tiny_clip(projection=False), "clip_l", _clip_inputs, _clip_forward),
    "clip_g": (lambda: tiny_clip(projection=True), "clip_g", _clip_inputs, _clip_forward),
}


@pytest.fixture(scope="module")
def hooked() -> Callable[[str], Hooked]:
    built: dict[str, Hooked] = {}

    def get(kind: str) -> Hooked:
        if kind not in built:
            build, component, inputs, forward = _BUILDERS[kind]
            model = build()
            pristine = copy.deepcopy(model)
            built[kind] = Hooked(model, pristine, attach_side_paths(model), component, inputs, forward)
        return built[kind]

    return get


def _load(path: Path, model: nn.Module, component: str) -> ResolvedLora:
    return resolve(load_lora_bytes(path.read_bytes(), path.name), model, component)


def _merged(pristine: nn.Module, stack: list[tuple[Truth, float]]) -> nn.Module:
    model = copy.deepcopy(pristine)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for truth, strength in stack:
            for name, f in truth.items():
                w = modules[name].weight
                w += strength * f.scale * (f.up.flatten(1) @ f.down.flatten(1)).reshape(w.shape)
    return model


# (model kind, file format, kwargs of write_lora)
CASES = [
    ("sd15", "kohya", {"targets": "all", "alpha": 2.0}),  # diffusers paths, LoCon incl. 1x1-conv proj_in
    ("sdxl", "kohya", {"targets": "all", "unet_ldm_names": True}),  # SDXL kohya: LDM paths
    ("sdxl", "peft", {"targets": "attn", "alpha": 8.0}),  # alpha from lora_adapter_metadata
    ("sdxl", "ldm", {"targets": "all"}),  # diffusion_model.* without alpha: alpha = rank
    ("clip_l", "kohya", {"targets": "all", "kohya_te": "te"}),  # SD1.5 lora_te_
    ("clip_l", "kohya", {"targets": "attn", "kohya_te": "te1"}),
    ("clip_l", "peft", {"targets": "all"}),
    ("clip_g", "kohya", {"targets": "all"}),  # lora_te2_, includes text_projection
    ("clip_g", "peft", {"targets": "attn", "alpha": 2.0}),
]


@pytest.mark.parametrize(
    ("kind", "fmt", "kwargs"), CASES, ids=[f"{k}-{f}-{i}" for i, (k, f, _) in enumerate(CASES)]
)
def test_side_path_equals_merged_weights(hooked, tmp_path, kind, fmt, kwargs):
    h = hooked(kind)
    path = tmp_path / "lora.safetensors"
    truth = write_lora(path, h.model, h.component, fmt=fmt, seed=3, **kwargs)
    lora = _load(path, h.model, h.component)
    assert set(lora.factors) == set(truth) and not lora.unmatched
    base = h.run(h.model, 2)
    for strength in (0.8, -0.6):
        with h.slots.plan([(0, 2, [(lora, strength)])]):
            out = h.run(h.model, 2)
        expected = h.run(_merged(h.pristine, [(truth, strength)]), 2)
        torch.testing.assert_close(out, expected, **TOL)
        assert (out - base).abs().max() > 1e-2  # the adapter really acts


@pytest.mark.parametrize(
    ("kind", "first", "second"),
    [
        ("sdxl", ("kohya", {"targets": "all", "unet_ldm_names": True}), ("peft", {"targets": "attn"})),
        ("clip_g", ("kohya", {"targets": "attn"}), ("peft", {"targets": "all", "alpha": 1.0})),
    ],
)
def test_stack_of_two_adapters_equals_merged(hooked, tmp_path, kind, first, second):
    h = hooked(kind)
    truths, loras = [], []
    for i, (fmt, kwargs) in enumerate((first, second)):
        path = tmp_path / f"lora{i}.safetensors"
        truths.append(write_lora(path, h.model, h.component, fmt=fmt, seed=10 + i, **kwargs))
        loras.append(_load(path, h.model, h.component))
    strengths = (0.8, -0.5)
    with h.slots.plan([(0, 2, list(zip(loras, strengths, strict=True)))]):
        out = h.run(h.model, 2)
    expected = h.run(_merged(h.pristine, list(zip(truths, strengths, strict=True))), 2)
    torch.testing.assert_close(out, expected, **TOL)


def test_mixed_batch_rows_equal_each_computed_alone(hooked, tmp_path):
    h = hooked("sdxl")
    paths = [tmp_path / f"{n}.safetensors" for n in "abc"]
    write_lora(paths[0], h.model, "unet", fmt="kohya", targets="all", unet_ldm_names=True, seed=20)
    write_lora(paths[1], h.model, "unet", fmt="peft", targets="attn", seed=21)
    write_lora(paths[2], h.model, "unet", fmt="ldm", targets="all", seed=22)
    a, b, c = (_load(p, h.model, "unet") for p in paths)
    s1, s2 = [(a, 0.7)], [(b, 1.0), (c, -0.4)]
    plan = row_groups([(2, s1), (2, []), (2, s2)])
    assert [(start, end) for start, end, _ in plan] == [(0, 2), (4, 6)]

    with h.slots.plan(plan):
        mixed = h.run(h.model, 6)
    plain = h.run(h.model, 6)  # same batch, no plan
    # Rows without LoRA are the base computation, bitwise, also against the model that never had hooks.
    assert torch.equal(mixed[2:4], plain[2:4])
    assert torch.equal(plain, h.run(h.pristine, 6))

    # Each group alone: its rows of the inputs as a batch of their own, with its stack.
    inputs = h.inputs(6)
    for rows, stack in ((slice(0, 2), s1), (slice(4, 6), s2)):
        with h.slots.plan([(0, 2, stack)]):
            alone = h.forward(h.model, {k: v[rows] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[rows], alone, **TOL)
        assert (mixed[rows] - plain[rows]).abs().max() > 1e-2


def test_row_groups_merges_adjacent_identical_stacks(hooked, tmp_path):
    h = hooked("clip_l")
    path = tmp_path / "l.safetensors"
    write_lora(path, h.model, "clip_l", fmt="kohya", seed=4)
    a = _load(path, h.model, "clip_l")
    b = _load(path, h.model, "clip_l")  # same file, separately resolved: a different adapter object
    plan = row_groups(
        [(1, [(a, 1.0)]), (2, [(a, 1.0)]), (1, [(a, 0.5)]), (3, []), (1, [(b, 0.5)]), (0, [(b, 1)])]
    )
    assert [(s, e, list(st)) for s, e, st in plan] == [
        (0, 3, [(a, 1.0)]),
        (3, 4, [(a, 0.5)]),
        (7, 8, [(b, 0.5)]),
    ]


def test_no_pollution_weights_and_base_output_bitwise(hooked, tmp_path):
    h = hooked("sd15")
    weights = {k: v.clone() for k, v in h.model.state_dict().items()}
    path = tmp_path / "p.safetensors"
    write_lora(path, h.model, "unet", fmt="kohya", targets="all", seed=5)
    lora = _load(path, h.model, "unet")
    before = h.run(h.model, 3)
    for strength in (1.0, -2.0, 0.3):
        with h.slots.plan([(0, 3, [(lora, strength)])]):
            h.run(h.model, 3)
        assert torch.equal(h.run(h.model, 3), before)
    with h.slots.plan([(0, 3, [(lora, 0.0)])]):  # strength 0 is the base computation
        assert torch.equal(h.run(h.model, 3), before)
    state = h.model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert torch.equal(before, h.run(h.pristine, 3))


def test_detach_restores_the_model(tmp_path):
    model = tiny_clip()
    inputs = _clip_inputs(2)
    reference = _clip_forward(model, inputs)
    slots = attach_side_paths(model)
    assert attach_side_paths(model) is slots
    path = tmp_path / "d.safetensors"
    write_lora(path, model, "clip_l", fmt="peft", seed=6)
    lora = _load(path, model, "clip_l")
    slots.detach()
    with slots.plan([(0, 2, [(lora, 1.0)])]):  # no hooks left: the plan has no effect
        assert torch.equal(_clip_forward(model, inputs), reference)
    assert attach_side_paths(model) is not slots


def test_plan_is_validated(hooked, tmp_path):
    h, other = hooked("clip_l"), hooked("clip_g")
    path = tmp_path / "v.safetensors"
    write_lora(path, h.model, "clip_l", fmt="kohya", seed=7)
    lora = _load(path, h.model, "clip_l")
    foreign = _load(path, other.model, "clip_l")  # same names fit: resolved against the other model
    with (
        pytest.raises(ValueError, match="disjoint, non-empty"),
        h.slots.plan([(0, 2, [(lora, 1)]), (1, 3, [])]),
    ):
        pass
    with pytest.raises(ValueError, match="another model"), h.slots.plan([(0, 1, [(foreign, 1.0)])]):
        pass
    with pytest.raises(BadRequest, match="finite"), h.slots.plan([(0, 1, [(lora, float("nan"))])]):
        pass
    with pytest.raises(ValueError, match="batch of 2"), h.slots.plan([(0, 4, [(lora, 1.0)])]):
        h.run(h.model, 2)


class _TransposedOutputLinear(nn.Linear):
    """A Linear subclass with its own forward (as GGUF layers have) and a non-contiguous output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias).t().contiguous().t()


def test_linear_subclasses_and_non_contiguous_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(_TransposedOutputLinear(6, 5), nn.Linear(5, 3))
    pristine = copy.deepcopy(model)
    slots = attach_side_paths(model)
    sd, truth = {}, {}
    for name, m in (("0", model[0]), ("1", model[1])):
        down, up = torch.randn(2, m.in_features), torch.randn(m.out_features, 2)
        sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
        truth[name] = LoraFactors(down, up, alpha=2.0)  # no alpha in the file: alpha = rank
    lora = resolve(parse_lora(sd, "tiny"), model, "unet")
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert not model[0](x).is_contiguous()
        with slots.plan([(1, 3, [(lora, -0.7)])]):
            out = model(x)
        expected = _merged(pristine, [(truth, -0.7)])(x)
        torch.testing.assert_close(out[1:3], expected[1:3], **TOL)
        assert torch.equal(out[[0, 3]], pristine(x)[[0, 3]])
