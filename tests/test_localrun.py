"""`luna-stack run --demo`: starts redis and the services, answers, serves a decode, stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
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


def _free_base_port() -> int:
    for _ in range(50):
        base = free_port() // 10 * 10
        if all(port_free(base + i) for i in range(1, 4)):
            return base
    raise RuntimeError("no free block of ports")


def test_local_run_mode_demo(tmp_path: Path) -> None:
    base = _free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "luna_stack.cli",
            "run",
            "--demo",
            "--services",
            "vae",
            "--models",
            str(tmp_path / "models"),
            "--state-dir",
            str(tmp_path / "state"),
            "--base-port",
            str(base),
        ],
        env={**env, "LUNA_DEVICE": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{base + 2}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("Luna Stack is up" in line for line in lines):  # printed once all are ready
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "local run mode never became ready:\n" + "".join(lines)
            time.sleep(0.2)
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(url + "/v1/status") as resp:
            status = json.loads(resp.read())
        assert status["redis"] is True  # it started its own redis-server
        assert [m["name"] for m in status["models"]] == ["vae/sd15-small-vae.safetensors"]
        with Client("vae", url=url) as client:
            out, _ = client.call(
                "decode", {"latent": torch.zeros(1, 4, 8, 8)}, {"model": "vae/sd15-small-vae"}
            )
        assert out["image"].shape == (1, 64, 64, 3)
        assert (tmp_path / "models" / "checkpoints" / "sdxl-small.safetensors").is_file()
        _check_local_redis(tmp_path / "state", "".join(lines))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "stopping (signal 2)" in output
    # Ctrl-C stopped everything: nothing answers any more.
    try:
        urllib.request.urlopen(url + "/health/live", timeout=2)
        raise AssertionError("service still answering after Ctrl-C")
    except OSError:
        pass


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
