"""Where the pack finds the services: LUNA_VAE_URL, LUNA_CLIP_URL, LUNA_UNET_URL, LUNA_REDIS_URL, LUNA_TOKEN.

A URL wins over Redis discovery; with neither, a service is looked for on its default local port.

LUNA_SAMPLE_ON_HOST=1 makes a shared MODEL sample on the host even in a ComfyUI with a GPU: the sampler's
own per-step work (CFG, the sampler's update) then runs on the CPU and every step travels over HTTP, so
this ComfyUI puts no work on the GPU between steps. Many ComfyUI processes with GPU work of their own
time-slice the GPU context by context; see the README's "Which frontend" section.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from luna_stack.jobs.redis import redacted
from luna_stack.wire.contract import KINDS, default_url

log = logging.getLogger("luna_stack.comfy")
ZERO_EDIT_ENV = "LUNA_ZERO_EDIT"
ZERO_EDIT_SETTING = "LunaStack.ZeroEdit"  # web/luna_stack.js registers it in ComfyUI's settings dialog
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


SAMPLE_ON_HOST_ENV = "LUNA_SAMPLE_ON_HOST"


@dataclass(frozen=True)
class PackSettings:
    urls: dict[str, str | None]
    redis_url: str | None
    token: str | None
    sample_on_host: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PackSettings:
        env = os.environ if env is None else env
        urls = {kind: (env.get(f"LUNA_{kind.upper()}_URL") or None) for kind in KINDS}
        on_host = _flag(env, SAMPLE_ON_HOST_ENV) is True
        return cls(urls, env.get("LUNA_REDIS_URL") or None, env.get("LUNA_TOKEN") or None, on_host)

    def describe(self, kind: str) -> str:
        """Where `kind` is looked for and why, for messages: `http://h:8103 (LUNA_UNET_URL)`."""
        if self.urls[kind]:
            return f"{self.urls[kind]} (LUNA_{kind.upper()}_URL)"
        if self.redis_url:
            return f"the Redis registry at {redacted(self.redis_url)} (LUNA_REDIS_URL)"
        return f"{default_url(kind)} (the default)"


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    """An on/off variable (1/0, true/false, yes/no, on/off); None when unset or unreadable (warned)."""
    value = (env.get(name) or "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        log.warning("Luna Stack: %s=%r is neither on (1) nor off (0); ignored", name, value)
    return None


def zero_edit_enabled(env: Mapping[str, str] | None = None, settings_file: Path | None = None) -> bool:
    """Zero-edit mode: LUNA_ZERO_EDIT when set (1/0, true/false, on/off), else the pack's setting in
    ComfyUI's settings file (user/default/comfy.settings.json), else off."""
    flag = _flag(os.environ if env is None else env, ZERO_EDIT_ENV)
    if flag is not None:
        return flag
    if settings_file is None or not settings_file.is_file():
        return False
    try:
        saved = json.loads(settings_file.read_text())
    except (OSError, ValueError) as exc:
        log.warning("Luna Stack: cannot read %s (%s); zero-edit mode stays off", settings_file, exc)
        return False
    return isinstance(saved, dict) and saved.get(ZERO_EDIT_SETTING) is True
