"""`luna-stack run`: the whole stack as local processes, no Docker.

Starts redis-server (unless LUNA_REDIS_URL names one) with a generated password (kept in
<state dir>/redis.password, mode 0600, never printed: the services get it in LUNA_REDIS_URL) and a
maxmemory budget, then one `luna-stack serve <kind>` process per service, waits until each answers
/health/ready, prints where everything is, and stops it all cleanly on Ctrl-C / SIGTERM (or when any
process dies on its own).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from luna_stack.config import load_settings
from luna_stack.jobs.redis import redacted
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


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
    return subprocess.Popen([sys.executable, "-m", "luna_stack.cli", "serve", kind], env=env)


def wait_ready(kind: str, url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until the service answers /health/ready; raise if it exits or takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"luna-stack serve {kind} exited with status {proc.returncode}")
        ok, why = _ready(url)
        if ok:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"luna-stack serve {kind} at {url} not ready after {timeout_s:.0f} s: {why}")
        time.sleep(0.2)


def _ready(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=2) as resp:
            return resp.status == 200, ""
    except urllib.error.HTTPError as err:
        return False, err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return False, str(exc)


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
            proc.kill()
            proc.wait()


def run_local(
    *,
    demo: bool,
    models: str | None,
    services: list[str] | None,
    config: str | None,
    state_dir: Path,
    base_port: int = 8100,
) -> int:
    env = dict(os.environ)
    if models:
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
    root = Path(settings.core.model_roots[0])
    if demo:
        if not (root / "checkpoints" / "sd15-small.safetensors").exists():
            from luna_stack.devtools.fixtures import write_models_dir

            log.info("--demo: writing small random-weight models to %s", root)
            write_models_dir(root, size="small")
        for kind in kinds:
            env.setdefault(f"LUNA_{kind.upper()}_PRELOAD", DEMO_PRELOAD[kind])

    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not settings.core.redis_url:
            procs["redis"], env["LUNA_REDIS_URL"] = _start_redis(
                state_dir, settings.core.local_redis_maxmemory_mb
            )
        urls = {}
        for kind in kinds:
            port = base_port + PORT_OFFSETS[kind]
            child_env = {**env, "LUNA_PORT": str(port)}
            procs[kind] = spawn_service(kind, child_env)
            urls[kind] = f"http://{settings.core.host}:{port}"
        pending = set(kinds)
        deadline = time.monotonic() + 600
        while stopping["signal"] is None:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    log.error("%s exited with status %s; stopping the stack", name, proc.returncode)
                    return 1
            for kind in sorted(pending):
                ok, _why = _ready(urls[kind])
                if ok:
                    pending.discard(kind)
                    log.info("%s ready at %s", kind, urls[kind])
                    if not pending:
                        _print_summary(urls, env["LUNA_REDIS_URL"], root, state_dir)
            if pending and time.monotonic() > deadline:
                log.error("not ready after 10 minutes: %s", ", ".join(sorted(pending)))
                return 1
            time.sleep(0.2)
        log.info("stopping (signal %s)", stopping["signal"])
        return 0
    finally:
        _stop(procs)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _print_summary(urls: dict[str, str], redis_url: str, root: Path, state_dir: Path) -> None:
    where = ""
    if redacted(redis_url) != redis_url and (state_dir / PASSWORD_FILE).is_file():
        where = f"   password in {state_dir / PASSWORD_FILE}"
    lines = ["", "Luna Stack is up (Ctrl-C stops everything):", f"  redis   {redacted(redis_url)}{where}"]
    lines += [f"  {kind:7s} {url}   status: {url}/v1/status" for kind, url in urls.items()]
    lines += [f"  models  {root}", ""]
    if "vae" in urls:
        lines.append(f"  try:   luna-stack status {' '.join(urls.values())}")
    print("\n".join(lines), flush=True)
