"""`luna-stack run`: a supervisor of real service processes. It starts redis and the services, serves a
decode, restarts a SIGKILLed service, refuses a taken port (naming who holds it), keeps --demo out of a
folder with models, and stops everything on Ctrl-C; `luna-stack status` reports it (exit status 1 when a
service is down)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
import torch

from luna_stack.client.http import Client
from luna_stack.devtools.localrun import port_free

from .conftest import free_port

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}


def _free_base_port() -> int:
    for _ in range(50):
        base = free_port() // 10 * 10
        if all(port_free(base + i) for i in range(1, 4)):
            return base
    raise RuntimeError("no free block of ports")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "luna_stack.cli", *args],
        env={**CLEAN_ENV, "LUNA_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Output:
    """The run's output, read as it comes."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.lines: list[str] = []
        self._proc = proc
        self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout or []), daemon=True)
        self._reader.start()

    def wait_for(self, pattern: str, count: int = 1, timeout_s: float = 240) -> re.Match[str]:
        """The count-th line matching `pattern`, once it has come."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [m for line in list(self.lines) if (m := re.search(pattern, line))]
            if len(found) >= count:
                return found[count - 1]
            assert self._proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"never came: {pattern}\n" + "".join(self.lines)
            time.sleep(0.2)

    def text(self) -> str:
        self._reader.join(timeout=10)
        return "".join(self.lines)


def _decodes(url: str) -> None:
    with Client("vae", url=url) as client:
        out, _ = client.call("decode", {"latent": torch.zeros(1, 4, 8, 8)}, {"model": "vae/sd15-small-vae"})
    assert out["image"].shape == (1, 64, 64, 3)


def test_local_run_supervises_restarts_a_killed_service_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = ["run", "--demo", "--services", "vae", "--auto-ports", "--state-dir", str(state)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "luna_stack.cli", *run],
        env={**CLEAN_ENV, "LUNA_DEVICE": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    try:
        out.wait_for("Luna Stack is up")  # printed once all are ready
        url = out.wait_for(r"vae ready at (http://127\.0\.0\.1:\d+)")[1]
        pid = int(out.wait_for(r"vae started \(pid (\d+)\)")[1])
        with urllib.request.urlopen(url + "/v1/status") as resp:
            status = json.loads(resp.read())
        assert status["redis"] is True  # it started its own redis-server
        assert [m["name"] for m in status["models"]] == ["vae/sd15-small-vae.safetensors"]
        assert status["process"]["pid"] == pid
        _decodes(url)
        _check_local_redis(state, out.text())
        # --demo wrote into its own folder, not ./models
        assert (state / "demo-models" / "checkpoints" / "sdxl-small.safetensors").is_file()

        # `luna-stack status` finds the run's (automatic) ports through its state file
        table = cli("status", "--state-dir", str(state))
        assert table.returncode == 0, table.stdout + table.stderr
        header, row = table.stdout.splitlines()
        assert header.split() == ["SERVICE", "URL", "STATE", "MODELS", "MEMORY", "QUEUE"]
        assert row.split()[:4] == ["vae", url, "ready", "vae/sd15-small-vae.safetensors"]
        assert "weights 5.3 MiB, cpu rss" in row and "0 batching, 0 jobs" in row
        as_json = json.loads(cli("status", "--json", "--state-dir", str(state)).stdout)
        assert as_json["ok"] is True and as_json["services"][0]["status"]["service"] == "vae"

        os.kill(pid, signal.SIGKILL)  # the supervisor notices, says why, and brings it back
        out.wait_for(rf"vae \(pid {pid}\) was killed by SIGKILL after .* restarting it in 1 s \(restart 1\)")
        assert int(out.wait_for(r"vae started \(pid (\d+)\)", count=2)[1]) != pid
        out.wait_for(rf"vae is ready again at {url} \(restart 1\)")
        _decodes(url)  # same address, serving again
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = out.text()
    assert proc.returncode == 0, text
    assert "stopping (signal 2)" in text
    assert "[vae] " in text  # the services' output, prefixed
    try:  # Ctrl-C stopped everything: nothing answers any more
        urllib.request.urlopen(url + "/health/live", timeout=2)
        raise AssertionError("service still answering after Ctrl-C")
    except OSError:
        pass
    assert not (state / "stack.json").exists()
    dead = cli("status", url)
    assert dead.returncode == 1 and "DOWN (connection refused)" in dead.stdout, dead.stdout


def test_local_run_refuses_a_taken_port_and_names_its_holder(tmp_path: Path) -> None:
    base = _free_base_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", base + 2))
        holder.listen()
        started = time.monotonic()
        run = cli(
            "run", "--services", "vae", "--base-port", str(base), "--state-dir", str(tmp_path / "state")
        )
    assert run.returncode == 2, run.stderr
    assert f"port {base + 2} (vae) on 127.0.0.1 is in use by pid {os.getpid()} (" in run.stderr
    assert "--base-port N" in run.stderr and "--auto-ports" in run.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "state").exists()  # nothing was started


def test_demo_never_writes_into_a_folder_that_has_models(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "real.safetensors").write_bytes(b"x")
    run = cli("run", "--demo", "--models", str(models), "--state-dir", str(tmp_path / "state"))
    assert run.returncode == 2
    assert f"{models} already holds models (checkpoints/real.safetensors, ...)" in run.stderr
    assert sorted(p.name for p in models.rglob("*")) == ["checkpoints", "real.safetensors"]


def test_status_exits_non_zero_for_a_service_that_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    down = cli("status", url)
    assert down.returncode == 1
    assert down.stdout.splitlines()[1].split() == ["?", url, "DOWN", "(connection", "refused)"]
    assert json.loads(cli("status", "--json", url).stdout) == {
        "ok": False,
        "services": [{"service": "?", "url": url, "state": "DOWN", "error": "connection refused"}],
    }


def _check_local_redis(state: Path, output: str) -> None:
    """The local redis-server: a generated password in a 0600 file, never printed, required; a
    maxmemory with the policy that never evicts job keys."""
    password_file = state / "redis.password"
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "redis.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert password not in output
    (shown,) = re.findall(r"redis\s+(redis://\S+)", output)
    assert shown.startswith("redis://:***@127.0.0.1:"), shown
    port = int(shown.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    client = redis.Redis(port=port, password=password)
    assert client.ping()
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    assert client.config_get("maxmemory") == {"maxmemory": str(2048 << 20)}
    client.close()
