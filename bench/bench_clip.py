"""CLIP service model path: latency of one SDXL encode vs a merged batch, in-process (no HTTP).

    python bench/bench_clip.py [--size full|small] [--device cuda] [--dtype fp16] [--json out.json]

Writes random-weight clip_l / clip_g files (full size: the real SDXL text encoders' shapes), loads them
as the service does, and times encode_jobs for 1 and N prompts merged in one forward, against N
requests one after another. Tokenization is timed separately (CPU, per prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from luna_stack.clip.bpe import shared_bpe
from luna_stack.clip.conditioning import EncodeJob, encode_jobs
from luna_stack.clip.models import load_clip_model
from luna_stack.clip.tokenize import CLIP_G, CLIP_L, tokenize
from luna_stack.core.fixtures import write_clip
from luna_stack.core.paths import ModelRoots

PROMPT = "a (cinematic:1.2) photo of a red fox in a snowy forest, golden hour, ((highly detailed)), 85mm"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="full", choices=["full", "small"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_clip(root / "clip" / "clip_l.safetensors", "l", args.size, dtype=torch.float16)
        write_clip(root / "clip" / "clip_g.safetensors", "g", args.size, dtype=torch.float16)
        started = time.perf_counter()
        model = load_clip_model(
            "clip_l.safetensors+clip_g.safetensors", ModelRoots([root]), device=device, dtype=dtype
        )
        load_s = time.perf_counter() - started

    bpe = shared_bpe()
    tokenize_ms = _time_ms(
        lambda: tokenize(f"{PROMPT} {time.perf_counter()}", CLIP_L, bpe, None, [], 64), device, 50
    )

    def job(i: int) -> EncodeJob:
        text = f"{PROMPT}, variant {i}"
        return EncodeJob({s.key: tokenize(text, s, bpe, None, [], 64) for s in (CLIP_L, CLIP_G)})

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "size": args.size,
        "load_s": round(load_s, 2),
        "tokenize_ms_per_prompt": round(tokenize_ms, 3),
        "merged_ms": {},
        "sequential_ms": {},
    }
    for n in (int(b) for b in args.batches.split(",")):
        jobs = [job(i) for i in range(n)]
        merged = _time_ms(lambda jobs=jobs: encode_jobs(model.encoders, "sdxl", jobs), device, args.repeats)
        sequential = _time_ms(
            lambda jobs=jobs: [encode_jobs(model.encoders, "sdxl", [j]) for j in jobs],
            device,
            max(3, args.repeats // 4),
        )
        results["merged_ms"][n] = round(merged, 2)  # type: ignore[index]
        results["sequential_ms"][n] = round(sequential, 2)  # type: ignore[index]
        print(f"{n:3d} prompts: merged {merged:8.2f} ms   one after another {sequential:8.2f} ms", flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
