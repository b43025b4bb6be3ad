"""What every benchmark shares: device sync, timing, result files and tables.

Each bench/bench_*.py measures its variants side by side in one run, prints a table of ratios and
writes bench/results/<name>[-small].json with the device it ran on. `--small` runs the CPU fixtures so
CI can check that the scripts still run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from luna_stack.devtools.embedded import free_port
from luna_stack.devtools.localrun import spawn_service, wait_ready
from luna_stack.devtools.supervisor import stop_processes

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def timed(fn: Callable[[], Awaitable[Any]], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        await fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return times


def timed_sync(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """`timed` for blocking calls (`fn` syncs the device itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def service_process(kind: str, env: dict[str, str], timeout_s: float = 600) -> Iterator[str]:
    """`luna-stack serve <kind>` as its own process (CUDA IPC needs two processes); yields its URL."""
    port = free_port()
    proc = spawn_service(kind, {**os.environ, **env, "LUNA_PORT": str(port), "LUNA_LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(kind, url, proc, timeout_s)
        yield url
    finally:
        stop_processes([(kind, proc)], timeout_s=30)


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda")
        else platform.processor() or "cpu"
    )


def write_results(
    name: str, small: bool, meta: dict[str, Any], rows: list[dict[str, Any]], device: str
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Smoke runs on the CPU fixtures are not results; real runs are kept per device.
    slug = "small" if small else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    path = RESULTS / f"{name}-{slug}.json"
    meta = {
        "benchmark": name,
        **meta,
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Columns a row lacks (a measurement that does not apply to it) read '-'."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    # Small values (relative errors, per-client GB) keep two significant digits instead of reading 0.00.
    return f"{value:.2g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
