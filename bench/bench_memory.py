"""GPU memory of N client processes generating through the stack against N standalone in-process
pipelines (N ComfyUI instances, each with its own UNet): total used memory of the GPU from NVML, read
while all N clients are alive, after their steps (SDXL 1024², batch 2 = CFG).

- stack_http: one `luna-stack serve unet` process (batching on; on CUDA every bucket's graph captured
  before ready, graph_capture=start, so the reading holds the graphs a steady service holds — the default
  background capture would not have run yet when the clients finish; batch sizes that gain nothing left
  eager) and N client processes
  sending steps as host tensors over HTTP (they never touch CUDA);
- stack_http_eager: the same with unet.graphs off: the caching allocator grows with the merged batch
  (batching trades activation memory, up to unet.max_batch rows, for throughput);
- stack_http_unbatched: graphs and batching off, so the service's activations stay those of one step and
  what the stack adds per client shows alone;
- in_process: N processes, each loading its own fp16 copy of the UNet and running the same steps.

Every run starts fresh processes, the service too: the caching allocator keeps its peak, so a reused
service would carry the previous run's activations. Clients start their steps together so that
concurrent steps can batch.

    python -m bench.bench_memory            # SDXL on the GPU
    python -m bench.bench_memory --small    # CPU: the whole flow, memory null (no GPU to read)
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from luna_stack.gpu.nvml import nvml_status

from .common import print_table, service_process

# Spawned clients import this module again: diffusers and the service stay out of its top level
# (main() and the in-process client import them), so an HTTP client costs what a ComfyUI node pack does.

# Service settings per stack mode (a setting this version lacks is ignored); None = in-process clients.
MODES: dict[str, dict[str, str] | None] = {
    "stack_http": {"LUNA_UNET_GRAPH_CAPTURE": "start"},  # its graphs held while measured, as in steady state
    "stack_http_eager": {"LUNA_UNET_GRAPHS": "false"},
    "stack_http_unbatched": {"LUNA_UNET_GRAPHS": "false", "LUNA_UNET_BATCHING": "false"},
    "in_process": None,
}
GB = 1e9
COLUMNS = [
    "mode",
    "clients",
    "gpu_used_gb",
    "delta_gb",
    "per_extra_client_gb",
    "vs_in_process",
    "gpu_processes",
    "largest_batch",
    "note",
]


@dataclasses.dataclass(frozen=True)
class Job:
    """What every client process of one run gets."""

    root: str
    model: str
    precision: str  # fp16 on the GPU: what ComfyUI runs an SDXL UNet in
    device: str
    steps: int
    inputs: dict[str, torch.Tensor]  # host tensors, cast to the model's dtype by whoever computes
    url: str | None = None  # the service (stack modes); None = load the UNet in the client (in_process)


class ClientFailed(RuntimeError):
    def __init__(self, message: str, oom: bool = False):
        super().__init__(message)
        self.oom = oom


def client_main(job: Job, index: int, reports: Any, start: Any, release: Any) -> None:
    """One client process: get ready, run `job.steps` steps once `start` is set, report, stay alive (and
    resident) until `release`, so the parent reads the GPU with every client's memory in place."""
    try:
        if job.url is not None:
            from luna_stack.client.http import Client

            with Client("unet", url=job.url, ipc="off", name=f"bench-memory-{index}") as client:
                reports.put({"index": index, "state": "ready"})
                start.wait()
                rows = [
                    client.call("step", job.inputs, {"model": job.model})[1]["batch_rows"]
                    for _ in range(job.steps)
                ]
                reports.put({"index": index, "state": "done", "largest_batch": max(rows), "gpu_uuid": None})
                release.wait()
            return
        from luna_stack.gpu.device import gpu_uuid, select_device
        from luna_stack.unet.loader import load_diffusion_model

        from .unet_common import device_inputs, forward

        device = select_device(job.device)
        model = load_diffusion_model(job.model, Path(job.root) / job.model, job.precision, device)
        batch = device_inputs(model, job.inputs)
        reports.put({"index": index, "state": "ready"})
        start.wait()
        for _ in range(job.steps):
            forward(model, batch)
        rows = job.inputs["x"].shape[0]
        reports.put({"index": index, "state": "done", "largest_batch": rows, "gpu_uuid": gpu_uuid(device)})
        release.wait()
    except Exception as exc:
        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
        error = f"client {index}: {exc!r}"[:2000]
        reports.put({"index": index, "state": "error", "error": error, "oom": oom})


def _collect(reports: Any, procs: list[Any], state: str, timeout_s: float) -> list[dict[str, Any]]:
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            msg = reports.get(timeout=1)
        except queue.Empty:
            dead = [f"client {i}: exit {p.exitcode}" for i, p in enumerate(procs) if p.exitcode is not None]
            if dead:
                raise ClientFailed(f"clients exited before '{state}': {', '.join(dead)}") from None
            if time.monotonic() > deadline:
                missing = len(procs) - len(got)
                raise ClientFailed(f"{missing} clients not '{state}' after {timeout_s:.0f} s") from None
            continue
        if msg["state"] == "error":
            raise ClientFailed(msg["error"], oom=msg["oom"])
        if msg["state"] == state:
            got[msg["index"]] = msg
    return [got[i] for i in range(len(procs))]


@contextlib.contextmanager
def clients(job: Job, n: int, timeout_s: float = 600) -> Iterator[list[dict[str, Any]]]:
    """`n` client processes that have all run their steps and are still alive; yields their reports."""
    ctx = mp.get_context("spawn")  # a fork would copy this process's state (and any CUDA context)
    reports, start, release = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=client_main, args=(job, i, reports, start, release), daemon=True) for i in range(n)
    ]
    for proc in procs:
        proc.start()
    try:
        _collect(reports, procs, "ready", timeout_s)
        start.set()  # together, so that concurrent steps can meet in one batch
        yield _collect(reports, procs, "done", timeout_s)
    except BaseException:
        for proc in procs:  # the others may wait on `start` forever
            proc.kill()
        raise
    finally:
        release.set()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def gpu_used() -> dict[str, tuple[int, int]]:
    """Used bytes and compute-process count per GPU UUID (NVML); empty without a GPU or NVML."""
    return {g["uuid"]: (g["memory_used_bytes"], len(g["processes"])) for g in nvml_status()["gpus"]}


def run_once(job: Job, mode: str, n: int) -> dict[str, Any]:
    """One (mode, N) run in fresh processes: GPU memory while all N clients are alive after their steps."""
    before = gpu_used()
    with contextlib.ExitStack() as stack:
        settings = MODES[mode]
        if settings is not None:
            env = {
                "LUNA_MODEL_ROOTS": job.root,
                "LUNA_DEVICE": job.device,
                "LUNA_DTYPE": job.precision,
                "LUNA_UNET_PRECISION": job.precision,
                "LUNA_UNET_PRELOAD": job.model,
                **settings,
            }
            job = dataclasses.replace(job, url=stack.enter_context(service_process("unet", env)))
        reports = stack.enter_context(clients(job, n))
        uuid = reports[0]["gpu_uuid"] or (_service_uuid(job.url) if job.url else None)
        used, processes = gpu_used().get(uuid or "", (None, None))
    return {
        "used": used,
        "delta": None if used is None else used - before[uuid][0],
        "gpu_processes": processes,
        "largest_batch": max(r["largest_batch"] for r in reports),
    }


def _service_uuid(url: str) -> str | None:
    from luna_stack.client.http import Client

    with Client("unet", url=url) as client:
        return client.status().get("gpu_uuid")


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / GB


def table(results: dict[tuple[str, int], dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        runs = [(n, r) for (m, n), r in results.items() if m == mode]
        first = next(((n, r) for n, r in runs if r.get("used") is not None), None)
        for n, r in runs:
            local = results.get(("in_process", n), {})
            extra = None
            if first is not None and r.get("used") is not None and n > first[0]:
                # What each client beyond the smallest run adds: the target is <= 0.1 GB over HTTP.
                extra = (r["used"] - first[1]["used"]) / (n - first[0])
            ratio = None
            if r.get("delta") is not None and local.get("delta"):
                ratio = r["delta"] / local["delta"]
            rows.append(
                {
                    "mode": mode,
                    "clients": n,
                    "gpu_used_gb": _gb(r.get("used")),
                    "delta_gb": _gb(r.get("delta")),
                    "per_extra_client_gb": _gb(extra),
                    "vs_in_process": ratio,
                    "gpu_processes": r.get("gpu_processes"),
                    "largest_batch": r.get("largest_batch"),
                    "note": r.get("note", ""),
                }
            )
    return rows


def main() -> None:
    from luna_stack.devtools.fixtures import unet_config
    from luna_stack.gpu.device import select_device

    from .unet_common import config_inputs, defaults, model_file, models_root, parser, save

    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(steps=3)
    p.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    args = defaults(p.parse_args())
    counts = sorted(int(c) for c in args.clients.split(","))
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}")
    precision = "fp32" if args.small else ("fp16" if args.dtype == "auto" else args.dtype)
    started = time.perf_counter()
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with models_root(args) as root:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        job = Job(
            root=str(root),
            model=model_file(args, root),
            precision=precision,
            device=args.device,
            steps=args.steps,
            inputs=config_inputs(unet_config(args.family, args.size), 2, args.latent, seed=0, dtype=dtype),
        )
        for mode in modes:
            failed = None
            for n in counts:
                if failed:
                    results[mode, n] = {"note": f"not run: {failed}"}
                    continue
                run_started = time.perf_counter()
                try:
                    results[mode, n] = run_once(job, mode, n)
                except ClientFailed as exc:
                    if not exc.oom:
                        raise
                    failed = f"{n} clients did not fit"
                    results[mode, n] = {"note": "did not fit"}
                took = time.perf_counter() - run_started
                print(f"{mode} x{n} ({took:.0f} s): {results[mode, n]}", flush=True)
    rows = table(results, modes)
    device = str(select_device(args.device))  # only now: the bench process itself holds no CUDA context
    print(f"UNet {args.family} {args.size} ({precision}), latent {args.latent}², batch 2 (CFG), {device}")
    print_table(rows, COLUMNS)
    meta = {"clients": counts, "precision": precision, "units": "GB = 1e9 bytes"}
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print("results:", save("memory", args, rows, device, **meta))


if __name__ == "__main__":
    main()
