"""What a UNet step costs on the wire: a GPU-less ComfyUI (tensors on the host) reaching the unet service
over HTTP, before (float32, conditioning every step) and after (the model's compute dtype, conditioning
held by the service and referred to by id); with --device cuda also the same GPU through CUDA IPC.

Request shapes are full size (SD1.5 512²: x 2×4×64×64, context 2×77×768; SDXL 1024²: x 2×4×128×128,
context 2×77×2048, y 2×2816). On the CPU the networks are "wire-width" fixtures: the full input and
conditioning widths with narrow channels, so a step measures the transport more than the forward.
`--latent N` keeps the conditioning full size with an N×N latent (on the CPU a full-size latent's forward
takes seconds and hides the transport); `--small` (CI smoke) uses 8×8 latents.

    python -m bench.bench_wire [--device cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from comfy_nodes.remote import Services, wire_dtype
from comfy_nodes.settings import PackSettings
from luna_stack.devtools.embedded import free_port
from luna_stack.devtools.fixtures import unet_config, write_unet
from luna_stack.weights import ldm_layout

from .common import print_table, service_process, write_results

FAMILIES = {"sd15": (64, 768, None), "sdxl": (128, 2048, 2816)}  # latent side, context width, y width


def wire_width_unet(path: Path, family: str) -> None:
    """Narrow channels, one resnet a level, the family's full conditioning widths."""
    config = unet_config(family, "small")
    _, context, adm = FAMILIES[family]
    config.update(layers_per_block=1, cross_attention_dim=context)
    if adm is not None:
        config.update(projection_class_embeddings_input_dim=adm)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    sd = ldm_layout.unet_diffusers_to_ldm(unet.state_dict(), config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def step_args(family: str, side: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    _, context, adm = FAMILIES[family]
    cond = torch.Generator().manual_seed(1000)
    args = {
        "x": torch.randn(2, 4, side, side, generator=gen),
        "timesteps": torch.full((2,), 999.0 - seed),
        "context": torch.randn(2, 77, context, generator=cond),
    }
    if adm is not None:
        args["y"] = torch.randn(2, adm, generator=cond)
    return {k: v.to(device) for k, v in args.items()}


def run_family(svc: Services, family: str, side: int, gpu: str | None, steps: int) -> list[dict[str, Any]]:
    """Every variant's steps interleaved (one step of each in turn), so load drift hits all alike."""
    model = f"unet/{family}.safetensors"
    compact = wire_dtype(svc.unet_load(model))
    client = svc.client("unet")

    def before(t: dict[str, torch.Tensor]) -> torch.Tensor:  # the pack until now: float32, all of it
        return client.call("step", t, {"model": model, "lora": []})[0]["out"]

    def after(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return svc.unet_step(model, **t, dtype=compact)

    variants = [("http float32, full", before, "cpu"), ("http compact, held", after, "cpu")]
    if gpu is not None:
        variants.append(("ipc compact, held", after, gpu))
    wire = client.aio
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    sizes: dict[str, list[int]] = {name: [] for name, _, _ in variants}
    replies: dict[str, list[int]] = {name: [] for name, _, _ in variants}
    for i in range(steps + 1):  # step 0 warms up and carries the conditioning of a sampling run
        for name, step, device in variants:
            inputs = step_args(family, side, i, device)
            sent, received = wire.bytes_sent, wire.bytes_received
            started = time.perf_counter()
            step(inputs)
            times[name].append(time.perf_counter() - started)
            sizes[name].append(wire.bytes_sent - sent)
            replies[name].append(wire.bytes_received - received)
    rows = []
    for name, _, _ in variants:
        rows.append(
            {
                "family": family,
                "latent": side,
                "variant": name,
                "step_ms": statistics.median(times[name][1:]) * 1000,
                "first_request_kb": sizes[name][0] / 1024,
                "request_kb": statistics.median(sizes[name][1:]) / 1024,
                "reply_kb": statistics.median(replies[name][1:]) / 1024,
            }
        )
    base = rows[0]
    for r in rows:
        r["time_vs_before"] = r["step_ms"] / base["step_ms"]
        r["bytes_vs_before"] = (r["request_kb"] + r["reply_kb"]) / (base["request_kb"] + base["reply_kb"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="8×8 latents (CI smoke)")
    parser.add_argument(
        "--latent", type=int, help="latent side instead of the family's (conditioning stays full)"
    )
    args = parser.parse_args()
    full_size = args.device.startswith("cuda") and not args.small
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in FAMILIES:
            path = root / "unet" / f"{family}.safetensors"
            if full_size:
                write_unet(path, family, "full", dtype=torch.float16)
            else:
                wire_width_unet(path, family)
        # Graphs captured before ready: back-to-back steps leave no idle time for background captures.
        env = {
            "LUNA_MODEL_ROOTS": str(root),
            "LUNA_DEVICE": args.device,
            "LUNA_DTYPE": "fp16",
            "LUNA_UNET_GRAPH_CAPTURE": "start",
        }
        with service_process("unet", env) as url:
            dead = f"http://127.0.0.1:{free_port()}"
            svc = Services(PackSettings({"clip": dead, "vae": dead, "unet": url}, None, None))
            try:
                gpu = args.device if args.device.startswith("cuda") else None
                for family, (side, _, _) in FAMILIES.items():
                    side = 8 if args.small else args.latent or side
                    rows += run_family(svc, family, side, gpu, args.steps)
            finally:
                svc.close()
    columns = ["family", "latent", "variant", "step_ms", "first_request_kb", "request_kb", "reply_kb"]
    columns += ["time_vs_before", "bytes_vs_before"]
    print_table(rows, columns)
    meta = {"steps": args.steps, "wire_width": not full_size, "service_dtype": "fp16", "interleaved": True}
    path = write_results("wire", args.small, meta, rows, args.device)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
