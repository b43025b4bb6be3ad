"""The one configuration loader: a YAML file, then `LUNA_*` environment variables on top.

Core keys sit at the top level of the YAML file (`host: 0.0.0.0`, env `LUNA_HOST`); each service owns a
section (`vae: {max_batch: 8}`, env `LUNA_VAE_MAX_BATCH`) declared in `services/<kind>/settings.py` with
`@section("<kind>")`. Every key carries its documentation, so the README table and the validation
messages come from the same place.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from luna_stack.wire.contract import DEFAULT_PORTS, KINDS, is_loopback
from luna_stack.wire.errors import ConfigError

ENV_PREFIX = "LUNA_"
_SECTIONS: dict[str, type] = {}
T = TypeVar("T")


def setting(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A documented, validated configuration key (use as a dataclass field default)."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(name: str):
    """Register a service's settings dataclass under its YAML section / env prefix."""

    def register(cls: type[T]) -> type[T]:
        _SECTIONS[name] = cls
        return cls

    return register


@dataclasses.dataclass
class CoreSettings:
    host: str = setting("127.0.0.1", "Address to bind. Anything but loopback requires `token`.")
    port: int = setting(
        0,
        "Port to bind; 0 = the service's default ("
        + ", ".join(f"{kind} {port}" for kind, port in DEFAULT_PORTS.items())
        + ").",
        minimum=0,
        maximum=65535,
    )
    token: str | None = setting(None, "Bearer token required on every request except /health/*.")
    replica_address: str | None = setting(
        None, "host:port this replica advertises in the Redis registry (default: its bind address)."
    )
    redis_url: str | None = setting(
        None, "Redis URL for job queues, the registry and caches; unset = no queue, no registry."
    )
    model_roots: list[str] = setting(
        ["./models"],
        "Model directories in ComfyUI layout (checkpoints/, vae/, clip/, unet/, loras/, "
        "embeddings/); env: colon-separated. No model path may leave them.",
    )
    device: str = setting("auto", "Compute device: auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N.")
    dtype: str = setting(
        "auto",
        "Weights/compute dtype: auto (bf16 where supported, else fp16 on GPU, "
        "fp32 on CPU), fp32, fp16, bf16.",
        choices=("auto", "fp32", "fp16", "bf16"),
    )
    max_body_mb: float = setting(512.0, "Largest request body accepted, in MiB.", minimum=0.001)
    read_timeout_s: float = setting(
        30.0, "A request body that sends nothing for this long is answered 408 and dropped.", minimum=0.1
    )
    max_client_requests: int = setting(
        64,
        "Most requests one client (X-Luna-Client, else its address) may have in flight; 429 beyond.",
        minimum=1,
    )
    max_models: int = setting(
        8,
        "Most models resident per service: loading one more unloads the least recently used model that "
        "is not on the preload list, or is refused when all are.",
        minimum=1,
    )
    max_model_gb: float = setting(
        0.0, "Most GiB of weights resident per service, evicting as max_models does; 0 = no limit.", minimum=0
    )
    log_level: str = setting("info", "Logging level.", choices=("debug", "info", "warning", "error"))
    result_ttl_s: int = setting(3600, "How long queued-job results stay in Redis, in seconds.", minimum=1)
    claim_idle_ms: int = setting(
        30000,
        "A queued job held this long by a replica that stopped heartbeating is taken over.",
        minimum=100,
    )
    job_max_attempts: int = setting(3, "Deliveries of one queued job before it is failed.", minimum=1)
    job_ttl_s: int = setting(
        3600,
        "A queued job that waited this long for a replica (or whose replica stopped renewing it this "
        "long ago) fails as expired and its input is deleted from Redis.",
        minimum=1,
    )
    max_job_mb: float = setting(
        128.0,
        "Largest queued-job body, in MiB: job bodies sit in Redis until a replica finishes them; "
        "bigger ones get 413 (synchronous calls are limited by max_body_mb only).",
        minimum=0.001,
    )
    local_redis_maxmemory_mb: int = setting(
        2048,
        "`luna-stack run` only: maxmemory of the redis-server it starts, with policy volatile-lru, so "
        "only keys with a TTL (caches, heartbeats) are ever evicted, never queued jobs or results.",
        minimum=16,
    )
    ipc_idle_s: float = setting(
        900.0,
        "A client's CUDA IPC buffer unused this long is unmapped (the client maps it again on its next "
        "request); buffers of exited clients are unmapped at once when they share the PID namespace.",
        minimum=1,
    )
    held_mb: float = setting(
        512.0,
        "Most MiB of held tensors (conditioning a client sent once and refers to afterwards) a service "
        "keeps on its device for all clients together; the least recently used go first.",
        minimum=0,
    )
    held_mb_per_client: float = setting(
        64.0,
        "Most MiB of held tensors per client; a tensor larger than this is not kept (sent every time).",
        minimum=0,
    )
    held_idle_s: float = setting(
        600.0, "A client's held tensors are dropped after it sent no request for this long.", minimum=1
    )
    heartbeat_s: float = setting(
        5.0, "Registry heartbeat period; entries expire after 3 periods.", minimum=0.1
    )
    slow_request_ms: float = setting(
        1000.0,
        "Requests taking at least this long are kept in the recent slow requests of /v1/status and the "
        "status page (the last 50).",
        minimum=0,
    )


@dataclasses.dataclass
class Settings:
    core: CoreSettings
    sections: dict[str, Any]

    def of(self, cls: type[T]) -> T:
        for value in self.sections.values():
            if isinstance(value, cls):
                return value
        raise KeyError(f"no settings section of type {cls.__name__}")

    def with_core(self, **changes: Any) -> Settings:
        core = dataclasses.replace(self.core, **changes)
        _validate_core(core)
        return Settings(core, self.sections)


def _register_service_sections() -> None:
    for kind in KINDS:
        try:
            importlib.import_module(f"luna_stack.{kind}.settings")
        except ModuleNotFoundError as exc:
            if exc.name != f"luna_stack.{kind}.settings":
                raise


def _base_type(hint: Any) -> tuple[type, bool]:
    """(type, optional) for `int`, `str | None`, `list[str]`..."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _base_type(inner)[0], True
    if origin is list:
        return list, False
    return hint, False


def _coerce(value: Any, hint: Any, key: str, env_name: str) -> Any:
    typ, optional = _base_type(hint)
    if value is None or (optional and isinstance(value, str) and value == ""):
        if optional:
            return None
        raise ConfigError(f"{key} must not be empty (set it in the config file or {env_name})")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is list:
            if isinstance(value, str):
                sep = ":" if key == "model_roots" else ","
                return [part.strip() for part in value.split(sep) if part.strip()]
            if isinstance(value, list):
                return [str(v) for v in value]
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key} must be {'a list' if typ is list else 'a ' + typ.__name__}, got {value!r} "
            f"(fix it in the config file or {env_name})"
        ) from None
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")


def _check_bounds(obj: Any, prefix: str, env_prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        env_name = f"{env_prefix}{f.name.upper()}"
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(
                f"{key} must be one of {', '.join(meta['choices'])}, got {value!r} ({env_name})"
            )
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ConfigError(f"{key} must be >= {meta['minimum']}, got {value!r} ({env_name})")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise ConfigError(f"{key} must be <= {meta['maximum']}, got {value!r} ({env_name})")


def _validate_core(core: CoreSettings) -> None:
    _check_bounds(core, "", ENV_PREFIX)
    if not is_loopback(core.host) and not core.token:
        raise ConfigError(
            f"host is {core.host!r} (reachable from other machines) but no token is set: "
            f"set LUNA_TOKEN (clients send it as a bearer token) or bind 127.0.0.1"
        )
    if not core.model_roots:
        raise ConfigError("model_roots must name at least one directory (LUNA_MODEL_ROOTS)")
    if core.device != "auto" and core.device != "cpu" and not core.device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {core.device!r} (LUNA_DEVICE)")


def _build(cls: type[T], data: Mapping[str, Any], env: Mapping[str, str], prefix: str, env_prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names:
        env_name = f"{env_prefix}{name.upper()}"
        key = f"{prefix}{name}"
        if env_name in env:
            kwargs[name] = _coerce(env[env_name], hints[name], key, env_name)
        elif name in data:
            kwargs[name] = _coerce(data[name], hints[name], key, env_name)
    obj = cls(**kwargs)
    _check_bounds(obj, prefix, env_prefix)
    return obj


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Load the YAML file (argument, else LUNA_CONFIG, else none) and apply the environment on top."""
    env = os.environ if env is None else env
    _register_service_sections()
    path = path or env.get("LUNA_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (check --config or LUNA_CONFIG)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded or {}
    section_data = {name: data.pop(name, None) or {} for name in _SECTIONS}
    for name, value in section_data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys")
    core = _build(CoreSettings, data, env, "", ENV_PREFIX)
    _validate_core(core)
    sections = {
        name: _build(cls, section_data[name], env, f"{name}.", f"{ENV_PREFIX}{name.upper()}_")
        for name, cls in _SECTIONS.items()
    }
    return Settings(core, sections)


def settings_table() -> str:
    """Markdown table of every key: the README's configuration table is this output."""
    _register_service_sections()
    rows = ["| key | environment | default | meaning |", "|---|---|---|---|"]
    groups: list[tuple[str, str, type]] = [("", ENV_PREFIX, CoreSettings)]
    groups += [(f"{n}.", f"{ENV_PREFIX}{n.upper()}_", c) for n, c in sorted(_SECTIONS.items())]
    for prefix, env_prefix, cls in groups:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "—" if default is None else f"`{default}`"
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append(f"| `{prefix}{f.name}` | `{env_prefix}{f.name.upper()}` | {shown} | {doc} |")
    return "\n".join(rows)
