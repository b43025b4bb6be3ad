"""What a client and a service agree on besides the body format: service kinds, their default ports and
operations, headers, and the names the step and conditioning params use. Importable anywhere (no torch)."""

from __future__ import annotations

import ipaddress

KINDS = ("clip", "vae", "unet")
DEFAULT_PORTS = {"clip": 8101, "vae": 8102, "unet": 8103}
OPS = {
    "clip": ("encode", "encode_dual", "tokenize"),
    "vae": ("decode", "encode", "decode_tiled", "encode_tiled"),
    "unet": ("step",),
}

CONTENT_TYPE = "application/vnd.luna.safetensors"
CLIENT_HEADER = "X-Luna-Client"  # the caller's stable name: batching fairness, IPC buffer ownership
OPEN_PATHS = ("/health/live", "/health/ready")  # answered without the bearer token

# Held tensors (server/held.py, client/held.py): params `"_held": {"keep": {name: id}, "use": {name: id}}`.
# `keep`: the request carries tensor `name` and the service keeps a copy under `id`, per client; `use`:
# the request leaves `name` out and the service takes the copy it kept under `id` (409
# `unknown_reference` when it has none: the client sends the tensor again). The reply's params say which
# kept names the service actually kept: `"_held": {"kept": [name, ...]}`.
HELD_PARAM = "_held"
HELD_KEEP = "keep"
HELD_USE = "use"
HELD_KEPT = "kept"
HELD_ID_CHARS = 64  # longest id a client may choose

# Control residuals of a UNet step travel as tensors `control.<kind>.<index>`.
CONTROL_KINDS = ("input", "middle", "output")
# CLIPTextEncodeSDXL's size conditioning and its defaults, passed through the CLIP service.
SIZE_DEFAULTS = {
    "width": 1024,
    "height": 1024,
    "crop_w": 0,
    "crop_h": 0,
    "target_width": 1024,
    "target_height": 1024,
}
SIZE_KEYS = tuple(SIZE_DEFAULTS)
VAE_SCALE = 8  # spatial compression of the SD1.x / SDXL VAEs: pixels per latent pixel


def default_url(kind: str) -> str:
    return f"http://127.0.0.1:{DEFAULT_PORTS[kind]}"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address, IPv6 without brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
