"""`luna-stack run`: the whole stack as local processes, no Docker.

Checks every port first, starts redis-server (unless LUNA_REDIS_URL names one) with a generated password
(kept in <state dir>/redis.password, mode 0600, never printed: the services get it in LUNA_REDIS_URL) and
a maxmemory budget, then one `luna-stack serve <kind>` process per service under a supervisor
(devtools/supervisor.py: a service that dies is restarted with backoff), prints where everything is once
all are ready, and stops it all cleanly on Ctrl-C / SIGTERM. If redis-server itself dies, the stack stops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from luna_stack.config import load_settings
from luna_stack.devtools.supervisor import (
    Child,
    Supervisor,
    check_ports,
    free_ports,
    port_free,
    ready,
    serve_command,
    stop_processes,
    write_state,
)
from luna_stack.jobs.redis import redacted
from luna_stack.weights.paths import MODEL_SUFFIXES
from luna_stack.wire.contract import KINDS
from luna_stack.wire.errors import ConfigError

log = logging.getLogger("luna_stack.run")
PORT_OFFSETS = {"clip": 1, "vae": 2, "unet": 3}
PASSWORD_FILE = "redis.password"
# What --demo preloads, so the first request is instant.
DEMO_PRELOAD = {
    "vae": "vae/sd15-small-vae.safetensors",
    "clip": "checkpoints/sd15-small.safetensors",
    "unet": "checkpoints/sd15-small.safetensors",
}


def available_services() -> list[str]:
    return [k for k in KINDS if importlib.util.find_spec(f"luna_stack.{k}.family") is not None]


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600, also when it existed with wider permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def start_redis_server(
    port: int,
    data_dir: Path,
    *,
    durable: bool,
    password: str | None = None,
    maxmemory_mb: int | None = None,
    fsync_always: bool = False,
) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:port keeping its files in data_dir (with durable: an append-only log,
    so queued jobs survive a restart of the stack too; fsync_always: fsynced before every reply).

    Its settings go into data_dir/redis.conf (mode 0600), so the password never shows in a process
    list. With maxmemory_mb the policy is volatile-lru: only keys with a TTL (caches, heartbeats) are
    ever evicted; job keys carry none (the queue expires them itself), so queued jobs are never dropped
    and a full Redis refuses new ones instead (wire/keys.py)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            "no redis-server on PATH: install redis (apt-get install redis-server) "
            "or point LUNA_REDIS_URL at a running one"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {json.dumps(str(data_dir.resolve()))}",
        'save ""',
        f"appendonly {'yes' if durable else 'no'}",
        "logfile redis.log",
    ]
    if fsync_always:
        lines.append("appendfsync always")
    if password is not None:
        lines.append(f"requirepass {json.dumps(password)}")
    if maxmemory_mb is not None:
        lines += [f"maxmemory {maxmemory_mb}mb", "maxmemory-policy volatile-lru"]
    conf = data_dir / "redis.conf"
    write_private(conf, "\n".join(lines) + "\n")
    return subprocess.Popen([binary, str(conf.resolve())])


def redis_password(state_dir: Path) -> tuple[str, Path]:
    """The local Redis password: the one in state_dir/redis.password (kept with the data it protects),
    else a new random one written there with mode 0600."""
    path = state_dir / PASSWORD_FILE
    if path.is_file():
        password = path.read_text().strip()
        if password:
            path.chmod(0o600)
            return password, path
    password = secrets.token_hex(24)
    write_private(path, password + "\n")
    return password, path


def _start_redis(state_dir: Path, maxmemory_mb: int) -> tuple[subprocess.Popen[bytes], str]:
    port = next(p for p in range(6390, 6490) if port_free(p))
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)  # the append-only log holds every job's inputs and results
    password, password_file = redis_password(state_dir)
    proc = start_redis_server(port, state_dir, durable=True, password=password, maxmemory_mb=maxmemory_mb)
    url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
    log.info("redis-server on %s (data in %s, password in %s)", redacted(url), state_dir, password_file)
    return proc, url


def spawn_service(kind: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`luna-stack serve <kind>` as a child process with exactly `env`."""
    return subprocess.Popen(serve_command(kind), env=env)


def wait_ready(kind: str, url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until the service answers /health/ready; raise if it exits or takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"luna-stack serve {kind} exited with status {proc.returncode}")
        ok, why = ready(url)
        if ok:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"luna-stack serve {kind} at {url} not ready after {timeout_s:.0f} s: {why}")
        time.sleep(0.2)


def demo_models(state_dir: Path, models: str | None) -> Path:
    """Where --demo's small random models live: its own folder under the state dir, or --models when that
    folder holds no models yet (or already the demo's). Never into a folder with other models."""
    if models is None:
        return (state_dir / "demo-models").resolve()
    root = Path(models).resolve()
    if (root / "checkpoints" / "sd15-small.safetensors").exists():
        return root
    found = [p for p in root.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES] if root.is_dir() else []
    if found:
        raise ConfigError(
            f"--demo writes small random-weight models, but {root} already holds models "
            f"({found[0].relative_to(root)}, ...): drop --demo to serve them, or drop --models to use the "
            f"demo's own folder ({state_dir / 'demo-models'})"
        )
    return root


def run_local(
    *,
    demo: bool,
    models: str | None,
    services: list[str] | None,
    config: str | None,
    state_dir: Path,
    base_port: int = 8100,
    auto_ports: bool = False,
) -> int:
    env = dict(os.environ)
    if demo:
        env["LUNA_MODEL_ROOTS"] = str(demo_models(state_dir, models))
    elif models:
        env["LUNA_MODEL_ROOTS"] = str(Path(models).resolve())
    env.setdefault("LUNA_MODEL_ROOTS", str(Path("models").resolve()))
    if config:
        env["LUNA_CONFIG"] = str(Path(config).resolve())
    settings = load_settings(None, env=env)  # fail now, with the config error, not in each child
    kinds = services or available_services()
    unknown = sorted(set(kinds) - set(available_services()))
    if unknown:
        raise ConfigError(
            f"unknown or unavailable service(s): {', '.join(unknown)}; "
            f"available: {', '.join(available_services())}"
        )
    host = settings.core.host
    if auto_ports:
        ports = dict(zip(kinds, free_ports(len(kinds), host), strict=True))
    else:
        ports = {kind: base_port + PORT_OFFSETS[kind] for kind in kinds}
    check_ports(ports, host)  # before anything starts
    root = Path(settings.core.model_roots[0])
    if demo:
        if not (root / "checkpoints" / "sd15-small.safetensors").exists():
            from luna_stack.devtools.fixtures import write_models_dir

            log.info("--demo: writing small random-weight models to %s", root)
            write_models_dir(root, size="small")
        for kind in kinds:
            env.setdefault(f"LUNA_{kind.upper()}_PRELOAD", DEMO_PRELOAD[kind])

    redis: subprocess.Popen[bytes] | None = None
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor([Child(kind, host, ports[kind], env) for kind in kinds])
    state_file = state_dir / "stack.json"
    try:
        if not settings.core.redis_url:
            redis, env["LUNA_REDIS_URL"] = _start_redis(state_dir, settings.core.local_redis_maxmemory_mb)
        supervisor.start_all()
        announced = False
        deadline = time.monotonic() + 600
        while stopping["signal"] is None:
            if redis is not None and redis.poll() is not None:
                log.error("redis-server exited with status %s; stopping the stack", redis.returncode)
                return 1
            for child in supervisor.tick():
                log.info("%s ready at %s", child.kind, child.url)
            if not announced and not supervisor.pending():
                announced = True
                urls = {c.kind: c.url for c in supervisor.children}
                write_state(state_file, urls, env["LUNA_REDIS_URL"])
                _print_summary(urls, env["LUNA_REDIS_URL"], root, state_dir)
            if not announced and time.monotonic() > deadline:
                log.error("not ready after 10 minutes: %s", ", ".join(c.kind for c in supervisor.pending()))
                return 1
            time.sleep(0.2)
        log.info("stopping (signal %s)", stopping["signal"])
        return 0
    finally:
        supervisor.stop_all()
        if redis is not None:
            stop_processes([("redis-server", redis)])
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _cli() -> str:
    """How to call the CLI from here: the venv's script when it is not on PATH."""
    script = Path(sys.executable).with_name("luna-stack")
    on_path = shutil.which("luna-stack")
    return "luna-stack" if on_path and Path(on_path).resolve() == script.resolve() else str(script)


def _print_summary(urls: dict[str, str], redis_url: str, root: Path, state_dir: Path) -> None:
    where = ""
    if redacted(redis_url) != redis_url and (state_dir / PASSWORD_FILE).is_file():
        where = f"   password in {state_dir / PASSWORD_FILE}"
    lines = ["", "Luna Stack is up (Ctrl-C stops everything):", f"  redis   {redacted(redis_url)}{where}"]
    lines += [f"  {kind:7s} {url}   status page: {url}/" for kind, url in urls.items()]
    lines += [f"  models  {root}", ""]
    lines.append(f"  try:   {_cli()} status --state-dir {state_dir}")
    print("\n".join(lines), flush=True)
