"""`convert`: write an fp8 or GGUF copy of a diffusion model and report its size and output error.

    python -m luna_stack.unet.convert checkpoints/sdxl.safetensors --to Q8_0 [--out unet/sdxl-Q8_0.gguf]

Any architecture the unet service loads (arch.py) converts; keys keep the file's own layout (LDM for
SD1.5/SDXL, BFL for Flux, SAI for SD3), the checkpoint prefix dropped.
fp8: a standalone safetensors file; weights of 2+ dimensions as float8_e4m3fn, the rest (biases, norms)
fp16. The service serves it with e4m3 storage and bf16 compute.
GGUF: city96's ComfyUI-GGUF convention, so ComfyUI-GGUF loads the file too: `general.architecture`
sd1/sdxl/flux/sd3, 1-D and tiny (<= 1024 values) tensors F32, tensors whose last dimension is not a
multiple of the block reshaped to rows of 256 with `comfy.gguf.orig_shape.<key>`, F16 where neither
fits. Types: those the gguf package can quantize (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16); K-quants
(Q4_K_M...) need llama.cpp's quantizer, which the service then loads.

The report compares the copy's output with the source's in fp16 on the same random step inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file

from luna_stack.gpu.device import select_device
from luna_stack.weights.precision import FP8_STORAGE

from .arch import DiffusionModel
from .loader import architecture_of, load_diffusion_model, read_safetensors_model

GGUF_TARGETS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16")
TARGETS = ("fp8", *GGUF_TARGETS)
_TINY = 1024  # city96 keeps tensors of at most this many values in F32
_ROW = 256  # and reshapes to rows of 256 when the last dimension does not fit the block


@dataclass
class ConvertReport:
    source: str
    output: str
    target: str
    source_fp16_bytes: int  # the model's weights as fp16
    output_bytes: int  # the written file
    ratio: float
    max_abs_error: float  # vs the fp16 source, one step on random inputs
    relative_error: float  # max |error| / max |fp16 output|
    rms_relative_error: float


def write_fp8(sd: dict[str, torch.Tensor], out: Path) -> None:
    tensors = {k: (v.to(FP8_STORAGE) if v.ndim >= 2 else v.half()).contiguous() for k, v in sd.items()}
    save_file(tensors, str(out), metadata={"luna_convert": "fp8"})


def write_gguf(sd: dict[str, torch.Tensor], out: Path, arch: str, target: str) -> None:
    qtype = gguf.GGMLQuantizationType[target]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(out), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in sd.items():
        data = tensor.float().numpy()
        chosen = qtype
        if data.ndim <= 1 or data.size <= _TINY:
            chosen = gguf.GGMLQuantizationType.F32
        elif data.shape[-1] % block_size:
            if data.size % _ROW == 0:
                writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
                data = data.reshape(-1, _ROW)
            else:
                chosen = gguf.GGMLQuantizationType.F16
        writer.add_tensor(key, gguf.quants.quantize(data, chosen), raw_dtype=chosen)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _step(model: DiffusionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    step = model.parse_step(inputs, {})
    with torch.inference_mode():
        return model.forward(step.shape, step.tensors).float().cpu()


def default_output(source: Path, target: str) -> Path:
    suffix = ".safetensors" if target == "fp8" else ".gguf"
    return source.with_name(f"{source.stem}-{target}{suffix}")


def write_copy(source: Path, target: str, out: Path | None = None) -> tuple[Path, int]:
    """Write the converted copy only; returns its path and the source's weights as fp16 bytes."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    out = out or default_output(source, target)
    sd = read_safetensors_model(source)
    arch = architecture_of(sd, source.name)
    if target == "fp8":
        write_fp8(sd, out)
    else:
        write_gguf(sd, out, arch.gguf_arch({k: v.shape for k, v in sd.items()}), target)
    return out, sum(t.numel() * 2 for t in sd.values())


def convert(
    source: Path, target: str, out: Path | None = None, device: torch.device | None = None, latent: int = 64
) -> ConvertReport:
    device = device or select_device("auto")
    out, fp16_bytes = write_copy(source, target, out)
    model = load_diffusion_model(source.name, source, "fp16", device)
    inputs = model.example_inputs(2, latent, latent, seed=0)
    expected = _step(model, inputs)
    del model
    got = _step(load_diffusion_model(out.name, out, "fp16", device), inputs)
    error = (got - expected).abs()
    scale = float(expected.abs().max())
    output_bytes = out.stat().st_size
    return ConvertReport(
        source=str(source),
        output=str(out),
        target=target,
        source_fp16_bytes=fp16_bytes,
        output_bytes=output_bytes,
        ratio=output_bytes / fp16_bytes,
        max_abs_error=float(error.max()),
        relative_error=float(error.max()) / scale,
        rms_relative_error=float(error.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luna-stack convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="checkpoint, unet/ or diffusion_models/ file")
    parser.add_argument("--to", dest="target", required=True, choices=TARGETS)
    parser.add_argument("--out", type=Path, help="output file (default: next to the source)")
    parser.add_argument("--device", default="auto", help="device for the error measurement")
    parser.add_argument("--latent", type=int, default=64, help="latent side for the error measurement")
    args = parser.parse_args(argv)
    report = convert(args.source, args.target, args.out, select_device(args.device), args.latent)
    print(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
