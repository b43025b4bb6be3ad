"""Where the pack finds the services: LUNA_VAE_URL, LUNA_CLIP_URL, LUNA_UNET_URL, LUNA_REDIS_URL, LUNA_TOKEN.

A URL wins over Redis discovery; with neither, a service is looked for on its default local port.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from luna_stack.jobs.redis import redacted
from luna_stack.wire.contract import KINDS


@dataclass(frozen=True)
class PackSettings:
    urls: dict[str, str | None]
    redis_url: str | None
    token: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PackSettings:
        env = os.environ if env is None else env
        urls = {kind: (env.get(f"LUNA_{kind.upper()}_URL") or None) for kind in KINDS}
        return cls(urls, env.get("LUNA_REDIS_URL") or None, env.get("LUNA_TOKEN") or None)

    def describe(self, kind: str) -> str:
        """Where `kind` is looked for, for error messages."""
        if self.urls[kind]:
            return f"{self.urls[kind]} (LUNA_{kind.upper()}_URL)"
        if self.redis_url:
            return f"the Redis registry at {redacted(self.redis_url)} (LUNA_REDIS_URL)"
        return f"the default local port (set LUNA_{kind.upper()}_URL or LUNA_REDIS_URL)"
