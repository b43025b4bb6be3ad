"""The services as the pack uses them: one sync client per kind, readable errors, progress polling."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from luna_stack.client.http import Client
from luna_stack.wire.errors import LunaError, NotFound

from .errors import LunaStackError, LunaStackModelMissing, missing_model, user_error
from .lora_stack import LoraStack
from .names import Folder
from .settings import KINDS, PackSettings
from .wire import control_to_wire, image_to_wire

Progress = Callable[[int, int], None]
PROGRESS_POLL_S = 0.25
LISTING_TTL_S = 2.0  # one prompt's validation asks for the same lists many times
# Step inputs that stay the same through a sampling run: sent once, then referred to (client/held.py).
STICKY = ("context", "y", "guidance")
# The unet service's `dtype` (its models' compute dtype, GET /v1/unet/load) -> the dtype steps travel in.
WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# This ComfyUI process as the services see it: batching fairness, IPC buffer ownership, per-client counts.
CLIENT_NAME = f"comfyui-{socket.gethostname()}-{os.getpid()}"


class Services:
    """Clients for the three services, created on first use (ComfyUI may start before the stack)."""

    def __init__(self, settings: PackSettings | None = None, gpu: torch.device | None = None):
        self.settings = settings or PackSettings.from_env()
        self._gpu = gpu  # ComfyUI's compute device; found on first use when not given
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()
        self._pollers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="luna-progress")
        self._listings: dict[str, tuple[float, dict[str, Any]]] = {}

    def client(self, kind: str) -> Client:
        with self._lock:
            if kind not in self._clients:
                self._clients[kind] = Client(
                    kind,
                    url=self.settings.urls[kind],
                    redis_url=self.settings.redis_url,
                    token=self.settings.token,
                    name=CLIENT_NAME,
                )
            return self._clients[kind]

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
        self._pollers.shutdown(wait=False)

    # -- plumbing -------------------------------------------------------------------------------------
    def _ipc_gpu(self, client: Client) -> torch.device | None:
        """ComfyUI's GPU when the service computes on that same GPU: host tensors are then staged there
        and cross by CUDA IPC (a device copy each way instead of serialising them through a socket)."""
        if self._gpu is None:
            self._gpu = comfy_device()
        if self._gpu.type != "cuda" or not client.ipc_usable(self._gpu):
            return None
        return self._gpu

    def call(
        self,
        kind: str,
        op: str,
        tensors: Mapping[str, torch.Tensor] | None,
        params: Mapping[str, Any],
        progress: Progress | None = None,
        stage: bool = False,
        keep: tuple[str, ...] = (),
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One operation; with `stage`, host inputs and outputs go through CUDA IPC where it applies and
        the outputs come back on the host, where ComfyUI keeps images, latents and conditioning. `keep`:
        the sticky inputs (sent once, then referred to while unchanged)."""
        client = self.client(kind)
        try:
            gpu = self._ipc_gpu(client) if stage else None
            if gpu is not None:
                tensors = {name: t.to(gpu) for name, t in (tensors or {}).items()}
            if progress is None:
                out, info = client.call(op, tensors, params, device=gpu, keep=keep)
            else:
                request_id = uuid.uuid4().hex
                params = {**params, "request_id": request_id}
                future = self._pollers.submit(client.call, op, tensors, params, device=gpu, keep=keep)
                while True:
                    try:
                        out, info = future.result(timeout=PROGRESS_POLL_S)
                        break
                    except TimeoutError:
                        self._report(client, request_id, progress)
        except LunaError as exc:
            raise user_error(exc, kind, self.settings.describe(kind)) from exc
        if gpu is not None:
            out = {name: t.cpu() for name, t in out.items()}
        return out, info

    @staticmethod
    def _report(client: Client, request_id: str, progress: Progress) -> None:
        try:
            state = client.get_json(f"/v1/progress/{request_id}")
        except NotFound:  # not started yet, or already finished
            return
        progress(int(state["done"]), int(state["total"]))

    def get(self, kind: str, path: str) -> Any:
        try:
            return self.client(kind).get_json(path)
        except LunaError as exc:
            raise user_error(exc, kind, self.settings.describe(kind)) from exc

    def _listing(self, kind: str, fresh: bool = False) -> dict[str, Any]:
        """GET /v1/<kind>/models, reused for LISTING_TTL_S unless `fresh`."""
        now = time.monotonic()
        cached = self._listings.get(kind)
        if not fresh and cached is not None and now - cached[0] < LISTING_TTL_S:
            return cached[1]
        listing = self.get(kind, f"/v1/{kind}/models")
        self._listings[kind] = (now, listing)
        return listing

    def models(self, kind: str, fresh: bool = False) -> list[str]:
        """Model names a service can serve (loaded first)."""
        listing = self._listing(kind, fresh)
        loaded = [m["name"] for m in listing.get("loaded", [])]
        return list(dict.fromkeys(loaded + list(listing.get("available", []))))

    def loras(self, kind: str, fresh: bool = False) -> list[str]:
        """LoRA names (relative to loras/) the service can apply."""
        return list(self._listing(kind, fresh).get("loras", []))

    def require_lora(self, kind: str, name: str) -> None:
        """Raise the one-sentence error unless `kind`'s service can apply the LoRA `name`."""
        if name not in self.loras(kind) and name not in self.loras(kind, fresh=True):
            raise LunaStackModelMissing(
                f"LoRA {name!r} is in ComfyUI's loras folder, but the Luna Stack {kind.upper()} service at "
                f"{self.settings.describe(kind)} cannot see it: put the same file at loras/{name} under the "
                "stack's model roots (share the loras folder with ComfyUI) and queue the prompt again."
            )

    def names(self, folder: Folder) -> list[str]:
        """What ComfyUI's own loader for `folder` lists, for the files the service serves."""
        return folder.names(self.models(folder.kind))

    def resolve(self, folder: Folder, name: str, kind: str | None = None) -> str:
        """The service name for ComfyUI's `name` (or an old prefixed name); raises the one-sentence error
        when `kind`'s service (default: the folder's) is down or does not serve it."""
        kind = kind or folder.kind
        found = folder.service_name(name, self.models(kind))
        if found is None:  # a cached list may predate the file: ask again before saying no
            served = self.models(kind, fresh=True)
            found = folder.service_name(name, served)
        if found is None:
            raise missing_model(kind, self.settings.describe(kind), folder.label(name), folder.names(served))
        return found

    def problem(self, folder: Folder, name: str, kinds: tuple[str, ...] = ()) -> str | None:
        """None when every service in `kinds` (default: the folder's) serves `name`; else the sentence."""
        try:
            for kind in kinds or (folder.kind,):
                self.resolve(folder, name, kind)
        except LunaStackError as exc:
            return str(exc)
        return None

    def status(self) -> dict[str, Any]:
        """Every service's /v1/status, or the readable error for one that is down."""
        out: dict[str, Any] = {}
        for kind in KINDS:
            try:
                out[kind] = self.get(kind, "/v1/status")
            except LunaStackError as exc:
                out[kind] = {"error": str(exc)}
        return out

    # -- VAE --------------------------------------------------------------------------------------------
    def vae_load(self, model: str) -> dict[str, Any]:
        """The service's description of the VAE (latent_channels, family, ...), loading it if needed."""
        return self.call("vae", "load", None, {"model": model})[1]

    def vae_decode(
        self,
        model: str,
        samples: torch.Tensor,
        tiles: Mapping[str, int] | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """LATENT samples [B,C,h,w] -> IMAGE [B,H,W,3]; tiles = {tile_x, tile_y, overlap} in latent units."""
        op = "decode_tiled" if tiles else "decode"
        params = {"model": model, **(tiles or {})}
        out, _ = self.call("vae", op, {"latent": samples}, params, progress, stage=True)
        return out["image"]

    def vae_encode(
        self,
        model: str,
        pixels: torch.Tensor,
        tiles: Mapping[str, int] | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """IMAGE [B,H,W,C] -> raw latent; tiles = {tile_x, tile_y, overlap} in pixels."""
        op = "encode_tiled" if tiles else "encode"
        params = {"model": model, **(tiles or {})}
        out, _ = self.call("vae", op, {"image": image_to_wire(pixels)}, params, progress, stage=True)
        return out["latent"]

    # -- CLIP -------------------------------------------------------------------------------------------
    def clip_encode(
        self,
        model: str,
        prompt: Mapping[str, Any],
        lora: LoraStack = LoraStack(),
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """prompt: {"text": ...} / {"text_g", "text_l"} / {"tokens": wire tokens}, plus size keys."""
        params = {"model": model, **prompt, "lora": lora.to_wire()}
        if clip_skip is not None:
            params["clip_skip"] = clip_skip
        out, info = self.call("clip", "encode", None, params, stage=True)
        return out["cond"], out["pooled"], info

    def clip_family(self, model: str, family: str | None = None) -> str:
        """sd15, sdxl, flux or sd3: the conditioning the CLIP service gives this model (loads it if needed);
        `family` asks for another one its encoders allow (sd3 for a Flux pair), a 400 if they do not."""
        params = {"model": model, "text": "", **({"family": family} if family else {})}
        _, info = self.call("clip", "tokenize", None, params)
        return info.get("family") or ("sdxl" if "g" in info["tokens"] else "sd15")

    # -- UNet -------------------------------------------------------------------------------------------
    def unet_load(self, model: str) -> dict[str, Any]:
        return self.call("unet", "load", None, {"model": model})[1]

    def unet_step(
        self,
        model: str,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        control: Mapping[str, Any] | None = None,
        lora: LoraStack = LoraStack(),
        guidance: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """One step; the output in x's dtype. `dtype`: the model's compute dtype (wire_dtype of its
        description). x, context, y and control then travel in it: the service casts them to it anyway
        and computes `out` in it, so the result is bitwise the same as sending float32, in half the bytes.
        Timesteps and guidance stay float32 (the service embeds them in float32)."""

        def compact(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        tensors = {"x": compact(x), "timesteps": timesteps.float(), "context": compact(context)}
        if y is not None:
            tensors["y"] = compact(y)
        if guidance is not None:
            tensors["guidance"] = guidance.float()
        control_tensors, lengths = control_to_wire(control)
        tensors.update({name: compact(t) for name, t in control_tensors.items()})
        params: dict[str, Any] = {"model": model, "lora": lora.to_wire()}
        if lengths:
            params["control_lengths"] = lengths
        out = self.call("unet", "step", tensors, params, keep=STICKY)[0]["out"]
        return out.to(x.dtype)


def wire_dtype(info: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype a model's steps travel in, from the unet service's description (None: as given)."""
    return WIRE_DTYPES.get(str(info.get("dtype")))


def comfy_device() -> torch.device:
    """The device ComfyUI computes on (the CPU when the pack runs outside ComfyUI)."""
    try:
        import comfy.model_management
    except ImportError:
        return torch.device("cpu")
    return comfy.model_management.get_torch_device()


_shared: Services | None = None


def services() -> Services:
    """The pack's process-wide Services (configured from the environment on first use)."""
    global _shared
    if _shared is None:
        _shared = Services()
    return _shared
