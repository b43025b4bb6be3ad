"""The benchmark scripts still run (small CPU fixtures) and write their tables and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("script", "result", "columns"),
    [
        (
            "bench_unet_throughput.py",
            "unet_throughput-small.json",
            {"batched/unbatched", "batched/in_process"},
        ),
        ("bench_unet_lora.py", "unet_lora-small.json", {"case", "step_ms", "vs_0_loras"}),
        (
            "bench_overhead.py",
            "overhead-small.json",
            {"operation", "in_process_gpu_ms", "in_process_cpu_ms", "http_ms", "http/in_process"},
        ),
        ("bench_clip.py", "clip-small.json", {"prompts", "merged_ms", "sequential/merged"}),
        ("bench_wire.py", "wire-small.json", {"variant", "step_ms", "request_kb", "bytes_vs_before"}),
        (
            "bench_memory.py",
            "memory-small.json",
            {"mode", "clients", "gpu_used_gb", "per_extra_client_gb", "vs_in_process"},
        ),
        (
            "bench_precision.py",
            "precision-small.json",
            {"variant", "weights_gb", "bytes_vs_base", "step_ms", "time_vs_base", "rel_error"},
        ),
    ],
)
def test_bench_script_runs_small(script: str, result: str, columns: set[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    extra = {
        "bench_unet_throughput.py": ["--steps", "1", "--clients", "1,2"],
        "bench_unet_lora.py": ["--steps", "1"],
        "bench_overhead.py": ["--repeats", "1"],
        "bench_clip.py": ["--repeats", "2", "--batches", "1,2"],
        "bench_memory.py": ["--clients", "1,2", "--steps", "1", "--modes", "stack_http,in_process"],
        "bench_precision.py": ["--steps", "2"],
        "bench_wire.py": ["--steps", "2"],
    }[script]
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", "--small", *extra],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "results:" in proc.stdout
    data = json.loads((BENCH / "results" / result).read_text())
    assert data["meta"]["device"] == "cpu" and data["rows"]
    assert columns <= set(data["rows"][0])
