"""The service processes of `luna-stack run`: ports checked before anything starts (naming the process that
holds a taken one), each service started, watched and restarted with backoff when it dies (saying why), and
all stopped together.

Linux-first: the holder of a port is found through /proc; elsewhere the message names only the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from luna_stack.wire.errors import ConfigError

log = logging.getLogger("luna_stack.run")
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # wait before the 1st, 2nd, ... restart in a row
STABLE_S = 60.0  # a service up this long before it died starts again from the first backoff step
TAIL_LINES = 12


# -- ports ------------------------------------------------------------------------------------------------
def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as aiohttp binds)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the kernel considers free right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (/proc/net/tcp, tcp6: state 0A is LISTEN)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> str | None:
    """`pid 1234 (python -m luna_stack.cli serve vae)` for the process listening on `port`, if visible."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        command = " ".join(f.read().decode(errors="replace").replace("\0", " ").split())
                    return f"pid {pid} ({command[:120] or '?'})"
    return "another user's process" if os.geteuid() != 0 else None


def check_ports(ports: Mapping[str, int], host: str) -> None:
    """Refuse to start (ConfigError, one line per port) while any port is taken."""
    busy = []
    for name, port in ports.items():
        if not port_free(port, host):
            holder = port_holder(port)
            busy.append(f"port {port} ({name}) on {host} is in use" + (f" by {holder}" if holder else ""))
    if busy:
        raise ConfigError(
            "; ".join(busy) + ". Stop that process, or start on other ports: --base-port N (services on "
            "N+1..N+3) or --auto-ports (any free ports; `luna-stack status` finds them)"
        )


# -- processes --------------------------------------------------------------------------------------------
SUPERVISOR_ENV = "LUNA_SUPERVISOR_PID"


def die_with_supervisor() -> None:
    """Called by `luna-stack serve` when a supervisor started it: SIGTERM when the supervisor dies, even by
    SIGKILL, so no service outlives it (Linux; set here in the service itself, not in a fork hook)."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(supervisor):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def ready(url: str) -> tuple[bool, str]:
    """Whether url answers /health/ready with 200, and why not."""
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=2) as resp:
            return resp.status == 200, ""
    except urllib.error.HTTPError as err:
        return False, err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return False, str(exc)


@dataclass
class Child:
    """One supervised service process."""

    kind: str
    host: str
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic
    ready_at: float | None = None
    restarts: int = 0  # in a row, without a stable run between
    restart_at: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def serve_command(kind: str) -> list[str]:
    return [sys.executable, "-m", "luna_stack.cli", "serve", kind]


class Supervisor:
    """Starts the services, restarts one that dies (backoff, logging why), stops them all."""

    def __init__(self, children: list[Child]):
        self.children = children

    def start(self, child: Child) -> None:
        env = {**child.env, "LUNA_PORT": str(child.port), SUPERVISOR_ENV: str(os.getpid())}
        child.proc = subprocess.Popen(
            serve_command(child.kind), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        child.started, child.ready_at, child.restart_at = time.monotonic(), None, None
        child.tail.clear()
        threading.Thread(target=self._relay, args=(child, child.proc), daemon=True).start()
        log.info("%s started (pid %d) on %s", child.kind, child.proc.pid, child.url)

    def _relay(self, child: Child, proc: subprocess.Popen[bytes]) -> None:
        """The child's output, each line prefixed with its kind; the last lines kept for its obituary."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            child.tail.append(line)
            print(f"[{child.kind}] {line}", flush=True)

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def tick(self) -> list[Child]:
        """One look at every service: notice deaths, restart those due, notice readiness. Returns the
        services that became ready in this tick."""
        now, became_ready = time.monotonic(), []
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                self._died(child, proc, now)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                if port_free(child.port, child.host):
                    self.start(child)
                else:
                    holder = port_holder(child.port) or "another process"
                    log.error(
                        "%s: port %d is taken by %s; trying again in 5 s", child.kind, child.port, holder
                    )
                    child.restart_at = now + 5
            if child.proc is not None and child.ready_at is None and ready(child.url)[0]:
                child.ready_at = time.monotonic()
                if child.restarts:
                    log.info("%s is ready again at %s (restart %d)", child.kind, child.url, child.restarts)
                became_ready.append(child)
        return became_ready

    def _died(self, child: Child, proc: subprocess.Popen[bytes], now: float) -> None:
        assert proc.returncode is not None
        ran = now - child.started
        if child.ready_at is not None and now - child.ready_at >= STABLE_S:
            child.restarts = 0
        wait = BACKOFF_S[min(child.restarts, len(BACKOFF_S) - 1)]
        child.restarts += 1
        last = " | ".join(line for line in list(child.tail)[-3:] if line) or "no output"
        log.error(
            "%s (pid %d) %s after %.1f s (last output: %s); restarting it in %.0f s (restart %d)",
            child.kind,
            proc.pid,
            exit_reason(proc.returncode),
            ran,
            last,
            wait,
            child.restarts,
        )
        child.proc, child.ready_at, child.restart_at = None, None, now + wait

    def pending(self) -> list[Child]:
        return [c for c in self.children if c.ready_at is None]

    def stop_all(self, timeout_s: float = 15) -> None:
        stop_processes([(c.kind, c.proc) for c in self.children if c.proc is not None], timeout_s)
        for child in self.children:
            child.proc = None


def stop_processes(named: list[tuple[str, subprocess.Popen[bytes]]], timeout_s: float = 15) -> None:
    """SIGTERM to all at once, then SIGKILL to any still running after timeout_s."""
    for _name, proc in named:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name, proc in named:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
            proc.kill()
            proc.wait()


def write_state(path: Path, services: Mapping[str, str], redis_url: str | None) -> None:
    """Where this run's services are, for `luna-stack status` (removed again on stop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"pid": os.getpid(), "services": dict(services), "redis": redis_url}, indent=2)
    )
