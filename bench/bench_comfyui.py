"""The benchmark users care about: N real ComfyUI processes as clients, once holding their own models
(ComfyUI's loaders) and once through the stack (the pack's shared loaders), next to the GPU floor.

Every client is a ComfyUI process (bench/comfyui_client.py: headless, ComfyUI's execution engine and
model management, a ComfyUI checkout given by path — never vendored) running one example workflow of
examples/. For the local side the pack's loaders are swapped for ComfyUI's own (LunaStackUNetLoader ->
UNETLoader, ...), everything else stays the same prompt. All clients make their first image, then begin
their timed images together; images/min counts the timed images of all clients over the time from the
common start to the last image. GPU memory is NVML's used memory (all processes) sampled during the
timed images, its peak reported.

The floor is measured in the same run, after the clients: the stack's own diffusion model replaying a
captured CUDA graph of the batch the N clients form (their rows together), times the steps, plus one VAE
decode per image.

Stack rows come in three frontends: ComfyUI on the GPU stepping through CUDA IPC (`--clients`), ComfyUI
started with `--cpu` (`--cpu-frontends`) and ComfyUI on the GPU sampling on the host
(`--host-sampling`, LUNA_SAMPLE_ON_HOST=1); README, "Which frontend".

Parity: the first image of client 0 is saved in both modes (same seed); the report gives their
difference (the same weights through ComfyUI's modules and through the stack's).

    python -m bench.bench_comfyui --comfyui ~/ComfyUI --workflow examples/flux_dev_shared_txt2img.json \
        --models /models --clients 1,4 --local 1 --images 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from comfy_nodes.settings import SAMPLE_ON_HOST_ENV
from luna_stack.devtools.embedded import free_port
from luna_stack.devtools.localrun import spawn_service, wait_ready
from luna_stack.devtools.supervisor import stop_processes
from luna_stack.gpu.nvml import nvml_status

from .common import print_table, sync, write_results

ROOT = Path(__file__).resolve().parents[1]
MPS_PROBE_S = 60  # a CUDA process under a working MPS server starts in seconds
# The pack's loaders -> ComfyUI's own, with the inputs ComfyUI's take besides the pack's.
LOCAL_LOADERS = {
    "LunaStackUNetLoader": ("UNETLoader", {"weight_dtype": "default"}),
    "LunaStackCLIPLoader": ("DualCLIPLoader", {}),
    "LunaStackTripleCLIPLoader": ("TripleCLIPLoader", {}),
    "LunaStackVAELoader": ("VAELoader", {}),
    "LunaStackCheckpointLoader": ("CheckpointLoaderSimple", {}),
}
# Which services serve a loader's files: (kind, folder, the inputs naming the files).
SERVED = {
    "LunaStackUNetLoader": [("unet", "unet", ("unet_name",))],
    "LunaStackCLIPLoader": [("clip", "clip", ("clip_name1", "clip_name2"))],
    "LunaStackTripleCLIPLoader": [("clip", "clip", ("clip_name1", "clip_name2", "clip_name3"))],
    "LunaStackVAELoader": [("vae", "vae", ("vae_name",))],
    "LunaStackCheckpointLoader": [(kind, "checkpoints", ("ckpt_name",)) for kind in ("unet", "clip", "vae")],
}


@dataclass
class Workflow:
    prompt: dict[str, Any]
    steps: int
    width: int
    height: int
    rows_per_image: int  # cfg 1 runs the positive only; any other cfg a cond + uncond pair
    preload: dict[str, str] = field(default_factory=dict)  # service kind -> model name

    @classmethod
    def read(cls, path: Path, size: int | None, steps: int | None) -> Workflow:
        prompt = json.loads(path.read_text())
        sampler = next(n for n in prompt.values() if n["class_type"].startswith("KSampler"))
        for node in prompt.values():
            inputs = node["inputs"]
            if size is not None and {"width", "height"} <= set(inputs):
                inputs["width"] = inputs["height"] = size
        if steps is not None:
            sampler["inputs"]["steps"] = steps
        latent = next(n for n in prompt.values() if "batch_size" in n["inputs"])["inputs"]
        preload = {}
        for node in prompt.values():
            for kind, folder, keys in SERVED.get(node["class_type"], []):
                files = [node["inputs"].get(k, "none") for k in keys]
                preload[kind] = "+".join(f"{folder}/{f}" for f in files if f != "none")
        return cls(
            prompt,
            sampler["inputs"]["steps"],
            latent["width"],
            latent["height"],
            1 if float(sampler["inputs"]["cfg"]) == 1.0 else 2,
            preload,
        )

    def local(self) -> dict[str, Any]:
        """The same prompt with ComfyUI's own loaders."""
        out = json.loads(json.dumps(self.prompt))
        for node in out.values():
            if node["class_type"] in LOCAL_LOADERS:
                node["class_type"], extra = LOCAL_LOADERS[node["class_type"]]
                node["inputs"].update(extra)
        return out


class MemorySampler:
    """NVML's used memory of every GPU, summed, sampled every 0.2 s while running; the peak in GiB."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = sum(g["memory_used_bytes"] for g in nvml_status()["gpus"])
            self.peak = max(self.peak, used)
            self._stop.wait(0.2)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def _writer(folder: str, name: str) -> Any:
    """The full-size random-weight writer for a file an example workflow names (None: unknown name)."""
    from luna_stack.devtools import fixtures, fixtures_flux, fixtures_sd3, fixtures_t5, fixtures_vae16

    rules: list[tuple[str, str, Any]] = [
        ("unet", "flux1-dev", lambda p: fixtures_flux.write_flux(p, "dev", "full")),
        ("unet", "flux1-schnell", lambda p: fixtures_flux.write_flux(p, "schnell", "full")),
        ("unet", "sd3.5_large", lambda p: fixtures_sd3.write_sd3(p, "sd3.5-large", "full")),
        ("unet", "sd3.5_medium", lambda p: fixtures_sd3.write_sd3(p, "sd3.5-medium", "full")),
        ("clip", "clip_l", lambda p: fixtures.write_clip(p, "l", "full")),
        ("clip", "clip_g", lambda p: fixtures.write_clip(p, "g", "full")),
        ("clip", "t5xxl_fp16", lambda p: fixtures_t5.write_t5(p, "full")),
        ("clip", "t5xxl_fp8", lambda p: fixtures_t5.write_t5(p, "full", dtype=torch.float8_e4m3fn)),
        ("vae", "ae", lambda p: fixtures_vae16.write_vae16(p, "flux", "full", dtype=torch.bfloat16)),
        ("vae", "sd3.5_vae", lambda p: fixtures_vae16.write_vae16(p, "sd3", "full")),
        ("checkpoints", "v1-5", lambda p: fixtures.write_checkpoint(p, "sd15", "full")),
        ("checkpoints", "sd_xl", lambda p: fixtures.write_checkpoint(p, "sdxl", "full")),
    ]
    return next((write for f, stem, write in rules if f == folder and name.startswith(stem)), None)


def write_missing_models(workflow: Workflow, models: Path) -> None:
    """Random-weight files, full size in the real layouts, for every file the workflow names that the
    models directory lacks (bench only: the numbers need real shapes, not real weights)."""
    for name in {n for names in workflow.preload.values() for n in names.split("+")}:
        path = models / name
        if path.exists():
            continue
        folder, _, file = name.partition("/")
        write = _writer(folder, file)
        if write is None:
            raise SystemExit(f"{name} is missing and no fixture writer knows it")
        started = time.monotonic()
        write(path)
        print(f"wrote {name} ({path.stat().st_size / 2**30:.1f} GiB, {time.monotonic() - started:.0f} s)")


def run_clients(
    args: argparse.Namespace,
    prompt: dict[str, Any],
    n: int,
    pack: bool,
    env: dict[str, str],
    tag: str,
    *,
    comfy_args: tuple[str, ...] = (),
    wait_ready: str = "",
) -> dict[str, Any]:
    """N ComfyUI processes: first images, then the timed images begun together. With `wait_ready` the
    clients start with the services and wait for them (a cold start) before their first image."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{tag}-"))
    workflow = work / "workflow.json"
    workflow.write_text(json.dumps(prompt))
    start = work / "start"
    if importlib.util.find_spec("av") is None:  # ComfyUI imports PyAV; image workflows never use it
        stand_ins = str(ROOT / "tools" / "comfyui_standins")
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [stand_ins, os.environ.get("PYTHONPATH")]))}
    procs = []
    for i in range(n):
        cmd = [
            args.comfyui_python,
            str(ROOT / "bench" / "comfyui_client.py"),
            "--comfyui",
            args.comfyui,
            "--models",
            str(args.models),
            "--workflow",
            str(workflow),
            "--images",
            str(args.images),
            "--start-file",
            str(start),
            "--ready-file",
            str(work / f"ready{i}"),
            "--out",
            str(work / f"out{i}.json"),
            *(["--pack"] if pack else []),
            *(["--save-first", str(work / "first.safetensors")] if i == 0 else []),
            *([f"--wait-ready={wait_ready}", f"--timeout-s={args.timeout_s}"] if wait_ready else []),
            *[f"--comfy-arg={a}" for a in (*args.comfy_arg, *comfy_args)],
        ]
        log = (work / f"log{i}.txt").open("w")
        procs.append(subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + args.timeout_s
    while not all((work / f"ready{i}").exists() for i in range(n)):
        failed = [i for i, p in enumerate(procs) if p.poll() is not None]
        if failed or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            logs = "\n".join((work / f"log{i}.txt").read_text()[-3000:] for i in failed or range(n))
            raise SystemExit(
                f"{tag}: ComfyUI clients {failed or 'timed out'} before their first image:\n{logs}"
            )
        time.sleep(0.05)
    captures_s = _captured(env.get("LUNA_UNET_URL"), args.timeout_s)
    batching = _batching(env.get("LUNA_UNET_URL"))
    with MemorySampler() as memory:
        began = time.time()
        start.write_text("go")
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    reports = []
    for i, p in enumerate(procs):
        if p.returncode != 0:
            raise SystemExit(f"{tag}: client {i} failed:\n{(work / f'log{i}.txt').read_text()[-3000:]}")
        reports.append(json.loads((work / f"out{i}.json").read_text()))
    ends = [t for r in reports for t in r["image_ends"]]
    deltas = [b - a for r in reports for a, b in zip(r["step_times"], r["step_times"][1:], strict=False)]
    after = _batching(env.get("LUNA_UNET_URL"))
    latency = _status(env["LUNA_UNET_URL"])["latency_ms"] if env.get("LUNA_UNET_URL") else None
    return {
        "clients": n,
        "images": len(ends),
        "images_per_min": 60 * len(ends) / (max(ends) - began),
        "step_ms": statistics.median(deltas) * 1000 if deltas else None,
        "first_image_s": statistics.median(r["first_image_s"] for r in reports),
        "captures_waited_s": captures_s,
        "gpu_memory_gib": memory.gib,
        # Rows per UNet forward during the timed images (the stack's batcher).
        "mean_batch_rows": (after[1] - batching[1]) / (after[0] - batching[0])
        if after and batching
        else None,
        # Where the unet service's time went, per stage (its recent requests: mostly these timed images).
        "unet_latency_ms": latency,
        "first": load_file(str(work / "first.safetensors"))["image"],
    }


def _captured(url: str | None, timeout_s: float) -> float | None:
    """Seconds until the unet service has captured every graph the first images asked for (it captures in
    idle time, which the clients waiting here give it): the timed images measure the steady state."""
    if not url:
        return None
    started = time.monotonic()
    while any(m.get("pending") for m in _status(url)["graphs"]["models"]):
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"graph captures still pending after {timeout_s:.0f} s: no steady state to time")
        time.sleep(0.2)
    return time.monotonic() - started


def _batching(url: str | None) -> tuple[int, int] | None:
    """(batches, rows) the unet service has run so far."""
    if not url:
        return None
    b = _status(url)["batching"]
    return b["batches"], b["rows"]


@dataclass
class Stack:
    env: dict[str, str]  # the clients' LUNA_*_URL
    procs: dict[str, subprocess.Popen[bytes]]
    started: float
    ready_s: float | None = None  # from the start until every service answered /health/ready
    idle_gib: float | None = None  # the unet service's GPU memory then (weights resident, no traffic yet)

    @property
    def urls(self) -> str:
        return ",".join(self.env.values())

    def watch_ready(self, timeout_s: float) -> None:
        """Record ready_s, polling beside the clients (they wait for the services themselves)."""

        def watch() -> None:
            for kind, proc in self.procs.items():
                wait_ready(kind, self.env[f"LUNA_{kind.upper()}_URL"], proc, timeout_s)
            self.ready_s = time.monotonic() - self.started
            self.idle_gib = self.gpu_gib("unet")

        threading.Thread(target=watch, daemon=True).start()

    def gpu_gib(self, kind: str) -> float | None:
        """GPU memory NVML reports for one service's process."""
        pid = self.procs[kind].pid
        procs = [p for g in nvml_status()["gpus"] for p in g.get("processes", [])]
        used = [p["used_bytes"] for p in procs if p["pid"] == pid and p["used_bytes"] is not None]
        return used[0] / 2**30 if used else None


@contextlib.contextmanager
def stack(args: argparse.Namespace, workflow: Workflow) -> Iterator[Stack]:
    """The clip, vae and unet services as processes, each preloading the workflow's models; started, not
    waited for (the first clients start with them: the cold start)."""
    env = {
        **os.environ,
        "LUNA_MODEL_ROOTS": str(args.models),
        "LUNA_DEVICE": str(_device()),
        "LUNA_DTYPE": args.dtype,
        "LUNA_LOG_LEVEL": "warning",
        **{f"LUNA_{kind.upper()}_PRELOAD": name for kind, name in workflow.preload.items()},
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    started = time.monotonic()
    try:
        for kind in ("clip", "vae", "unet"):
            port = free_port()
            procs[kind] = spawn_service(kind, {**env, "LUNA_PORT": str(port)})
            urls[f"LUNA_{kind.upper()}_URL"] = f"http://127.0.0.1:{port}"
        services = Stack(urls, procs, started)
        services.watch_ready(args.timeout_s)
        yield services
    finally:
        stop_processes(list(procs.items()), timeout_s=30)


def run_stack(
    args: argparse.Namespace, workflow: Workflow, firsts: dict[str, torch.Tensor]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The shared-loader rows: the first client count starts with the services (its first image is the
    stack's cold start), then the other counts and the GPU-less frontends against the warm services."""
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    with stack(args, workflow) as services:
        runs = [("luna_stack", n, {}, ()) for n in _counts(args.clients)]
        runs += [("luna_stack_cpu_frontend", n, {}, ("--cpu",)) for n in _counts(args.cpu_frontends)]
        runs += [
            ("luna_stack_host_sampling", n, {SAMPLE_ON_HOST_ENV: "1"}, ())
            for n in _counts(args.host_sampling)
        ]
        for i, (mode, n, env, comfy_args) in enumerate(runs):
            # The first run starts with the services: its first image is the stack's cold start.
            cold = i == 0
            result = run_clients(
                args,
                workflow.prompt,
                n,
                pack=True,
                env={**services.env, **env},
                tag=f"{mode}{n}",
                wait_ready=services.urls if cold else "",
                comfy_args=comfy_args,
            )
            if cold:
                meta["services_ready_s"] = services.ready_s
                meta["cold_first_image_s"] = result["first_image_s"]
                meta["unet_service_gib_ready"] = services.idle_gib
            first = result.pop("first")
            if mode == "luna_stack":
                firsts.setdefault("stack", first)
            rows.append({"mode": mode, **result})
        meta["unet_service_gib_after"] = services.gpu_gib("unet")
        meta["unet_status_after"] = _status(services.env["LUNA_UNET_URL"])
    return rows, meta


def floor_step_ms(args: argparse.Namespace, workflow: Workflow, clients: int) -> float:
    """One step of the batch `clients` form, replaying a captured graph of the stack's own model."""
    from luna_stack.gpu.graph_config import GraphConfig
    from luna_stack.unet.loader import load_diffusion_model
    from luna_stack.unet.step_runner import build_runner

    device = _device()
    name = workflow.preload["unet"]
    model = load_diffusion_model(name, args.models / name, args.precision, device)
    rows = clients * workflow.rows_per_image
    config = GraphConfig(
        enabled=True,
        buckets=(rows,),
        capture="first_use",
        max_shapes=1,
        lora_slots=0,
        lora_rank=0,
        min_gain=None,
    )
    runner = build_runner(model, config, graphs=True)
    inputs = model.example_inputs(rows, workflow.height // 8, workflow.width // 8, seed=0)
    inputs["context"] = torch.randn(rows, args.context_tokens, inputs["context"].shape[2])
    step = model.parse_step({k: v.to(device, model.dtype) for k, v in inputs.items()}, {})
    parts = {k: [v] for k, v in step.tensors.items()}
    return _cuda_ms(lambda: runner.run(step.shape, parts, [(rows, ())]))


def floor(args: argparse.Namespace, workflow: Workflow, clients: int) -> dict[str, float]:
    """Graph replay of the batch `clients` form, per step, and one VAE decode, on the stack's own models."""
    from luna_stack.vae.model import load_vae

    step_ms = floor_step_ms(args, workflow, clients)
    device = _device()
    name = workflow.preload["vae"]
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    vae = load_vae(name, args.models / name, device, dtype)
    latent = torch.randn(1, vae.latent_channels, workflow.height // 8, workflow.width // 8, device=device)
    decode_ms = _cuda_ms(lambda: vae.decode(latent))
    per_image_s = (workflow.steps * step_ms / clients + decode_ms) / 1000
    return {"floor_step_ms": step_ms, "floor_decode_ms": decode_ms, "floor_images_per_min": 60 / per_image_s}


@contextlib.contextmanager
def mps(enabled: bool) -> Iterator[None]:
    """With `enabled`, every process of the run (ComfyUI clients and services) shares one NVIDIA MPS
    server, so their kernels run side by side instead of time-slicing the GPU context by context."""
    if not enabled:
        yield
        return
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise SystemExit("--mps needs nvidia-cuda-mps-control (the NVIDIA driver's utilities) on the PATH")
    pipes = Path(tempfile.mkdtemp(prefix="luna-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipes / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(pipes / "log")}
    for folder in env.values():
        Path(folder).mkdir()
    subprocess.run([control, "-d"], env={**os.environ, **env}, check=True)
    quit_server = lambda: subprocess.run([control], input=b"quit\n", env={**os.environ, **env}, check=False)  # noqa: E731
    _probe_mps(env, pipes / "log", quit_server)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by every process the run starts
    try:
        yield
    finally:
        quit_server()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probe_mps(env: dict[str, str], logs: Path, quit_server: Callable[[], object]) -> None:
    """A CUDA process under the new MPS server must start within MPS_PROBE_S: where the server cannot
    run (a VM's GPU, a compute mode), clients block in CUDA's init instead of failing."""
    probe = [sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()"]
    try:
        subprocess.run(probe, env={**os.environ, **env}, check=True, timeout=MPS_PROBE_S, capture_output=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
        quit_server()
        tail = "".join(p.read_text(errors="replace")[-2000:] for p in sorted(logs.glob("*.log")))
        raise SystemExit(
            f"--mps: a CUDA process did not start under the MPS server ({exc}); its logs:\n{tail}"
        ) from None


def _counts(spec: str) -> list[int]:
    return [int(c) for c in spec.split(",") if c]


def _status(url: str) -> dict[str, Any]:
    """What the unet service reports about itself after the runs: graphs, memory, batching."""
    with urllib.request.urlopen(f"{url}/v1/status", timeout=10) as reply:
        body = json.load(reply)
    keys = ("batching", "graphs", "models", "ipc", "held", "latency_ms", "lora_cache")
    return {k: body.get(k) for k in keys}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke run


def _cuda_ms(fn: Any, repeats: int = 10) -> float:
    device = _device()
    with torch.inference_mode():
        for _ in range(3):
            fn()
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (its code is run, never copied)")
    parser.add_argument(
        "--comfyui-python", default=sys.executable, help="a Python with ComfyUI's requirements"
    )
    parser.add_argument("--workflow", type=Path, required=True, help="one of examples/*_shared_*.json")
    parser.add_argument("--models", type=Path, required=True, help="models dir holding the workflow's files")
    parser.add_argument("--clients", default="1,4", help="stack client counts, e.g. 1,4")
    parser.add_argument("--local", default="1", help="ComfyUI-holds-its-own-models client counts ('' = none)")
    parser.add_argument(
        "--cpu-frontends", default="", help="stack client counts run as GPU-less ComfyUI (--cpu), e.g. 1"
    )
    parser.add_argument(
        "--host-sampling", default="", help="stack client counts of GPU ComfyUI sampling on the host, e.g. 8"
    )
    parser.add_argument("--images", type=int, default=3, help="timed images per client")
    parser.add_argument("--size", type=int, help="override the workflow's image size")
    parser.add_argument("--steps", type=int, help="override the workflow's steps")
    parser.add_argument("--dtype", default="bf16", help="the services' dtype (LUNA_DTYPE)")
    parser.add_argument("--precision", default="bf16", help="the floor model's precision")
    parser.add_argument("--context-tokens", type=int, default=256, help="the floor's context length")
    parser.add_argument("--comfy-arg", action="append", default=[], help="flags for the ComfyUI clients")
    parser.add_argument("--timeout-s", type=float, default=540)
    parser.add_argument("--name", default=None, help="result name (default comfyui_<workflow stem>)")
    parser.add_argument(
        "--mps", action="store_true", help="run every process under one NVIDIA MPS server (a control daemon)"
    )
    parser.add_argument(
        "--write-models", action="store_true", help="write full-size random-weight files the models dir lacks"
    )
    args = parser.parse_args()
    workflow = Workflow.read(args.workflow, args.size, args.steps)
    if args.write_models:
        write_missing_models(workflow, args.models)
    rows: list[dict[str, Any]] = []
    firsts: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"mps": args.mps}
    with mps(args.mps):  # the floors too: every process of the run alike
        for n in _counts(args.local):
            result = run_clients(args, workflow.local(), n, pack=False, env={}, tag=f"local{n}")
            firsts.setdefault("local", result.pop("first"))
            rows.append({"mode": "comfyui_own_models", **result})
        stack_rows, stack_meta = run_stack(args, workflow, firsts)
        rows += stack_rows
        meta.update(stack_meta)
        floors = {n: floor(args, workflow, n) for n in sorted({r["clients"] for r in rows})}
    for row in rows:
        row.update(floors[row["clients"]])
        row["vs_floor"] = row["images_per_min"] / row["floor_images_per_min"]
        own = next(
            (r for r in rows if r["mode"] == "comfyui_own_models" and r["clients"] == row["clients"]), None
        )
        ipc = next((r for r in rows if r["mode"] == "luna_stack" and r["clients"] == row["clients"]), None)
        if row["mode"] in ("luna_stack_cpu_frontend", "luna_stack_host_sampling") and ipc:
            row["time_per_image_vs_ipc"] = ipc["images_per_min"] / row["images_per_min"]
        row["vs_comfyui"] = row["images_per_min"] / own["images_per_min"] if own else None
    meta = {
        **meta,
        "workflow": args.workflow.name,
        "size": f"{workflow.width}x{workflow.height}",
        "steps": workflow.steps,
        "rows_per_image": workflow.rows_per_image,
        "images_per_client": args.images,
    }
    if {"local", "stack"} <= set(firsts):
        a, b = firsts["local"], firsts["stack"]
        meta["parity_first_image"] = {
            "max_abs": float((a - b).abs().max()),
            "mean_abs": float((a - b).abs().mean()),
            "psnr_db": float(10 * torch.log10(1 / (a - b).pow(2).mean().clamp_min(1e-12))),
        }
    print(json.dumps({k: v for k, v in meta.items() if k != "unet_status_after"}, indent=2))
    columns = ["mode", "clients", "images_per_min", "step_ms", "first_image_s", "gpu_memory_gib"]
    extra = ["mean_batch_rows", "time_per_image_vs_ipc"]
    print_table(rows, [*columns, "floor_images_per_min", "vs_floor", "vs_comfyui", *extra])
    small = _device().type == "cpu"
    name = args.name or f"comfyui_{args.workflow.stem}" + ("_mps" if args.mps else "")
    path = write_results(name, small, meta, rows, str(_device()))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
