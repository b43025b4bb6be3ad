"""One real ComfyUI process as a benchmark client (run by bench_comfyui.py with ComfyUI's Python).

ComfyUI runs headless through its own execution engine (PromptExecutor, no HTTP server) with its
default model management on the GPU. The workflow runs once for the first image (what a user waits
for after starting ComfyUI), then the process reports ready and waits for the driver's start file, so
every client's timed images begin together; then it runs `--images` more with new seeds. ComfyUI's
cache keeps unchanged nodes (loaders, text encodes) between runs, as between queued prompts.

Output (JSON, `--out`): start-up and first-image seconds, each image's end time (time.time(), the
driver's clock), and every sampling step's time from ComfyUI's progress hook.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.time()
ROOT = Path(__file__).resolve().parents[1]
# ComfyUI's folder name -> the models directory's folder (the stack's names; the docs' shared layout)
FOLDERS = {
    "checkpoints": "checkpoints",
    "diffusion_models": "unet",
    "text_encoders": "clip",
    "vae": "vae",
    "loras": "loras",
}
# The extras holding the standard nodes the example workflows use.
EXTRAS = ("nodes_flux.py", "nodes_sd3.py", "nodes_model_advanced.py", "nodes_custom_sampler.py")
SINK = "BenchImageSink"


def _sink_node(kept: dict[str, Any]) -> type:
    """An output node that finishes the image (a host copy, as SaveImage's) without writing a file."""

    class BenchImageSink:
        CATEGORY = "bench"
        RETURN_TYPES = ()
        FUNCTION = "take"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"images": ("IMAGE",)}}

        def take(self, images: Any) -> tuple:
            kept["image"] = images.float().cpu()
            return ()

    return BenchImageSink


def _wait_ready(urls: list[str], timeout_s: float) -> None:
    """Poll each service's /health/ready (what ComfyUI's user does after `luna-stack run`)."""
    from luna_stack.devtools.supervisor import ready

    deadline = time.monotonic() + timeout_s
    for url in urls:
        while not ready(url)[0]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} not ready after {timeout_s:.0f} s")
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    parser.add_argument("--models", required=True, type=Path, help="the models directory")
    parser.add_argument("--workflow", required=True, type=Path, help="API-format prompt (JSON)")
    parser.add_argument("--pack", action="store_true", help="load the Luna Stack node pack")
    parser.add_argument("--images", type=int, default=3, help="timed images after the first")
    parser.add_argument(
        "--start-file", type=Path, required=True, help="begin the timed images once it exists"
    )
    parser.add_argument("--ready-file", type=Path, required=True, help="written after the first image")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-first", type=Path, help="write the first image here (safetensors)")
    parser.add_argument("--comfy-arg", action="append", default=[], help="ComfyUI command-line flags")
    parser.add_argument(
        "--wait-ready",
        default="",
        help="comma-separated service URLs: run the first image once all answer /health/ready (a cold start: "
        "this process and the services were started together)",
    )
    parser.add_argument("--timeout-s", type=float, default=540, help="how long --wait-ready waits")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tests.comfyui_import import PromptServerStub, import_comfyui  # headless, torchvision covered

    execution, folder_paths, nodes = import_comfyui(args.comfyui, args.comfy_arg)
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    for comfy_folder, folder in FOLDERS.items():
        folder_paths.add_model_folder_path(comfy_folder, str(args.models / folder))
    for extra in EXTRAS:
        loaded = asyncio.run(
            nodes.load_custom_node(
                str(Path(args.comfyui) / "comfy_extras" / extra), module_parent="comfy_extras"
            )
        )
        if not loaded:
            raise SystemExit(f"ComfyUI could not load comfy_extras/{extra}")
    if args.pack and not asyncio.run(nodes.load_custom_node(str(ROOT / "comfy_nodes"))):
        raise SystemExit("ComfyUI could not load the Luna Stack pack")
    kept: dict[str, Any] = {}
    nodes.NODE_CLASS_MAPPINGS[SINK] = _sink_node(kept)

    prompt = json.loads(args.workflow.read_text())
    for node in prompt.values():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            node["class_type"], node["inputs"] = SINK, {"images": node["inputs"]["images"]}
    sampler = next(k for k, n in prompt.items() if n["class_type"].startswith("KSampler"))
    steps: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda *_, **__: steps.append(time.time()))
    executor = execution.PromptExecutor(
        PromptServerStub(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
    )

    def run(seed: int) -> None:
        seed_key = "seed" if "seed" in prompt[sampler]["inputs"] else "noise_seed"
        prompt[sampler]["inputs"][seed_key] = seed
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(seed), prompt, None))
        if not ok:
            raise SystemExit(f"invalid workflow: {error} {node_errors}")
        executor.execute(prompt, str(seed), {}, outputs)
        if not executor.success:
            errors = [m for m in executor.status_messages if m[0] == "execution_error"]
            raise SystemExit(f"the workflow failed: {errors}")

    imported = time.time()
    _wait_ready([u for u in args.wait_ready.split(",") if u], args.timeout_s)
    ready = time.time()
    run(0)
    first = time.time()
    if args.save_first is not None:
        save_file({"image": kept["image"].contiguous()}, str(args.save_first))
    first_steps = len(steps)
    args.ready_file.write_text("ready")
    while not args.start_file.exists():
        time.sleep(0.01)
    began = time.time()
    ends = []
    for i in range(args.images):
        run(i + 1)
        ends.append(time.time())
    report = {
        "started": STARTED,
        "import_s": imported - STARTED,
        "waited_for_services_s": ready - imported,
        "first_image_s": first - STARTED,
        "began": began,
        "image_ends": ends,
        "step_times": steps[first_steps:],
        "cuda": torch.cuda.is_available(),
    }
    args.out.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
