"""SD3 / SD3.5 steps on a real GPU (make test-gpu): captured CUDA graphs replay like the eager forward in
fp16 and fp8 (e4m3 storage, bf16 compute), with ControlNet residuals and LoRA stacks from the static bank,
and the GPU steps agree with the fp32 CPU forward.

Tolerances: graph vs eager differ only by kernels picked for padded row counts (max |Δ| / max |eager|
< 5e-3); fp16 vs fp32 CPU < 1e-2, fp8 vs fp32 < 0.1 (3 mantissa bits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from luna_stack.devtools.fixtures_sd3 import sd3_file_name, write_sd3
from luna_stack.devtools.lora_fixtures import write_lora
from luna_stack.lora.cache import LoraCache
from luna_stack.server.metrics import Metrics
from luna_stack.unet.loader import load_diffusion_model
from luna_stack.unet.sd3.arch import Sd3Model, Sd3Shape
from luna_stack.unet.step_runner import build_runner

from .test_graphs import graph_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda:0")
TOL = 5e-3
BOUND = {"fp16": 1e-2, "fp8": 0.1}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float().cpu() - ref.float().cpu()).abs().max() / ref.float().abs().max())


def requests(model: Sd3Model, rows: int, shape: Sd3Shape, seed: int) -> list[dict[str, torch.Tensor]]:
    """`rows` one-row requests (fp32 on the CPU, as clients send them) for `shape`."""
    out = []
    for i in range(rows):
        inputs = model.example_inputs(1, shape.height, shape.width, seed + i)
        inputs["context"] = inputs["context"][:, : shape.context]
        gen = torch.Generator().manual_seed(seed + 100 + i)
        tokens, hidden = model.tokens(shape.height, shape.width), model.hidden
        inputs |= {
            f"control.output.{b}": torch.randn(1, tokens, hidden, generator=gen) for b in shape.control
        }
        out.append(inputs)
    return out


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
@pytest.mark.parametrize("variant", ["sd3", "sd3.5-medium", "sd3.5-large"])
def test_graph_replay_equals_eager_and_the_cpu_forward(
    models_dir: Path, variant: str, precision: str
) -> None:
    path = models_dir / "unet" / sd3_file_name(variant)
    model = load_diffusion_model(variant, path, precision, CUDA)
    cpu = load_diffusion_model(variant, path, "fp32", torch.device("cpu"))
    assert isinstance(model, Sd3Model) and model.precision == precision
    lora_path = models_dir / "loras" / f"gpu-{variant}.safetensors"
    write_lora(
        lora_path, cpu.module, "unet", "peft", rank=4, alpha=32.0, targets="attn", seed=1
    )  # banked: Linears
    runner = build_runner(
        model, graph_config(buckets=(1, 2, 4), slots=2, rank=8), Metrics("unet").graph_forwards
    )
    lora = LoraCache(1 << 28, CUDA, model.dtype).resolve(lora_path, model.module, "unet")
    assert runner.cuda_graphs and runner.enabled == (precision != "fp8")  # fp8 steps eager (step_runner.py)
    shapes = [Sd3Shape(16, 16, 12), Sd3Shape(15, 21, 20, (0, 1))]  # odd latent + ControlNet residuals
    runner.warm_up(shapes)
    for shape in shapes:
        for rows in (1, 2, 3, 4):  # every bucket, full and padded (3 -> 4)
            for stack in ((), ((lora, 4.0),)):
                reqs = requests(model, rows, shape, seed=10 * rows)
                parts = {name: [r[name] for r in reqs] for name in reqs[0]}
                stacks = [(1, stack if i % 2 == 0 else ()) for i in range(rows)]
                graph = runner.run(shape, parts, stacks).clone()
                eager = runner.run_eager(shape, parts, stacks)
                # The bank and the side path add a LoRA in another order. Measured on the H200 in fp16 with
                # this strength-4 LoRA: 5.5e-3 with qk-norm (SD3.5), 2.1e-2 without (SD3: unnormalised
                # attention logits amplify the rounding); in fp32 on the CPU the two paths agree exactly.
                tol = TOL if not stack else 6 * TOL
                assert rel_err(graph, eager) < tol, (shape, rows, stack, rel_err(graph, eager))
                if not stack:
                    with torch.inference_mode():
                        ref = cpu.forward(shape, {k: torch.cat(v) for k, v in parts.items()})
                    assert rel_err(graph, ref) < BOUND[precision], (shape, rows, rel_err(graph, ref))
                else:
                    base = runner.run_eager(shape, parts, [(1, ())] * rows)
                    assert rel_err(eager[:1], base[:1]) > 4 * TOL  # row 0 has the LoRA: clearly moved
    assert runner.eager == {}


@pytest.mark.slow  # writes 4 and 16 GB files; make test-gpu runs it
@pytest.mark.parametrize("variant", ["sd3", "sd3.5-large"])
def test_full_size_step_at_1024(tmp_path: Path, variant: str) -> None:
    """The released configs (SD3 medium 4 GB, SD3.5 large 16 GB in fp16) at their native 1024² latent:
    loaded in fp16 and fp8, graph replay equals eager, outputs finite."""
    path = write_sd3(tmp_path / sd3_file_name(variant, "full"), variant, "full")
    for precision in ("fp16", "fp8"):
        model = load_diffusion_model(variant, path, precision, CUDA)
        assert (
            isinstance(model, Sd3Model) and model.config.num_layers == {"sd3": 24, "sd3.5-large": 38}[variant]
        )
        runner = build_runner(model, graph_config(buckets=(2,), slots=0), Metrics("unet").graph_forwards)
        (shape,) = model.warm_up_shapes(())
        runner.warm_up([shape])
        parts = {k: [v] for k, v in model.example_inputs(2, shape.height, shape.width, seed=1).items()}
        graph = runner.run(shape, parts, [(2, ())]).clone()
        eager = runner.run_eager(shape, parts, [(2, ())])
        assert torch.isfinite(graph).all() and rel_err(graph, eager) < TOL
        assert runner.eager == {}
        del model, runner
        torch.cuda.empty_cache()
