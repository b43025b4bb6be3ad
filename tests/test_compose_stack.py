"""The compose stack for real: images built, containers started by Docker Compose, driven by testcontainers.

`make test-compose` provides what this needs (tools/compose_test.sh: its own Docker engine, a Compose v2
CLI, the base, Redis and service images built without a registry) and runs this module. Elsewhere it
runs whenever a Docker engine answers and those images exist, and skips with the reason otherwise.

The stack is compose/docker-compose.yml with compose/cpu.yml: the host's network, every service on
127.0.0.1 at a free port, Redis with a password, models written by the project's fixture generator and
mounted read-only. Through the containers: a VAE decode and encode, a CLIP encode, a UNet step (CLIP ->
UNet -> VAE, checked against the same weights run here), queued jobs, 401 without the token; a service
that crashes is restarted by its restart policy and its running job taken over (XAUTOCLAIM); a service
stopped with `docker kill` (for Docker a manual stop: no restart policy applies) comes back with compose,
its job too; then everything is torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import torch
from redis.exceptions import AuthenticationError, ResponseError

try:  # the dev extras
    import docker
    from testcontainers.compose import DockerCompose
except ImportError as exc:
    docker = DockerCompose = None
    MISSING = f"testcontainers is not installed ({exc}): pip install -e '.[dev]'"
else:
    MISSING = None

# The one import of the project's client in this module (its module path moves with the packages).
from luna_stack.client.http import AsyncClient

from .conftest import free_port
from .test_unet_support import ldm_unet, reference_step, reference_unet
from .test_vae_service import reference_vae

pytestmark = [pytest.mark.compose, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILES = ["docker-compose.yml", "cpu.yml"]
COMPOSE_MIN = (2, 24)  # !reset
IMAGE = os.environ.get("LUNA_COMPOSE_IMAGE", "luna-stack:ci")
REDIS_IMAGE = os.environ.get("LUNA_COMPOSE_REDIS_IMAGE", "luna-stack-redis:ci")
DOCKER_CLI = os.environ.get("LUNA_DOCKER_CLI", "docker")
BIN = Path(sys.executable).parent
KINDS = ("clip", "vae", "unet")
CLIP_MODEL = "clip_l.safetensors"
VAE_MODEL = "sd15-small-vae.safetensors"
UNET_MODEL = "sd15-small-unet.safetensors"
SLOW_LATENT = 64  # a 512x512 decode: seconds on a CPU, long enough to kill its replica mid-job
TIMEOUT_S = 240  # a bound on every wait; the stack starts in ~20 s on two cores


def _compose_version() -> tuple[int, ...] | str:
    try:
        result = subprocess.run(
            [DOCKER_CLI, "compose", "version", "--short"], capture_output=True, text=True, timeout=30
        )
    except OSError as exc:
        return f"no docker CLI ({exc})"
    if result.returncode != 0:
        return f"no Compose v2 CLI plugin ({result.stderr.strip() or result.stdout.strip()})"
    version = result.stdout.strip().lstrip("v").split("-")[0]
    return tuple(int(part) for part in version.split(".")[:2])


def _why_not() -> str | None:
    """Why this machine cannot run the module, or None."""
    if MISSING is not None:
        return MISSING
    try:
        engine = docker.from_env(timeout=10)
        engine.ping()
    except Exception as exc:
        return f"no Docker engine answers ({str(exc)[:160]}); make test-compose starts one"
    if engine.api.base_url != "http+docker://localhost":
        # The stack shares the host's network: the checks read this machine's sockets and processes.
        return f"the Docker engine at {engine.api.base_url} is not on this machine's unix socket"
    for image in (IMAGE, REDIS_IMAGE):
        try:
            engine.images.get(image)
        except docker.errors.ImageNotFound:
            return f"image {image} is not built; make test-compose builds it"
    version = _compose_version()
    if isinstance(version, str):
        return version
    if version < COMPOSE_MIN:
        return f"Compose {version} is older than {COMPOSE_MIN} (compose/cpu.yml uses !reset)"
    return None


REASON = _why_not()
if REASON is not None:
    if os.environ.get("LUNA_COMPOSE_REQUIRED") == "1":
        pytest.fail(f"the compose test cannot run: {REASON}", pytrace=False)
    pytest.skip(REASON, allow_module_level=True)


@dataclass
class Stack:
    compose: DockerCompose
    project: str
    ports: dict[str, int]
    token: str
    redis_url: str
    models: Path
    engine: docker.DockerClient
    timings: dict[str, float] = field(default_factory=dict)

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.ports[kind]}"

    def client(self, kind: str, **kwargs: Any) -> AsyncClient:
        return AsyncClient(kind, url=self.url(kind), token=self.token, **kwargs)

    def queue_client(self, kind: str) -> AsyncClient:
        """Submits and waits through Redis, as a client elsewhere on the network would."""
        return AsyncClient(kind, redis_url=self.redis_url, token=self.token)

    def container(self, service: str) -> docker.models.containers.Container:
        return self.engine.containers.get(self.compose.get_container(service, include_all=True).ID)

    def logs(self) -> str:
        stdout, stderr = self.compose.get_logs()
        return "\n".join((stdout + stderr).splitlines()[-80:])


def _write_env(path: Path, values: dict[str, str]) -> None:
    path.touch(mode=0o600)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("compose")
    models = workdir / "models"
    subprocess.run(
        [BIN / "luna-stack", "fixtures", "--out", models, "--size", "small", "--families", "sd15"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    models.chmod(0o755)  # the mount's root: the services run as user 10001
    ports = {name: free_port() for name in ("redis", *KINDS)}
    token, password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    project = f"luna-stack-test-{secrets.token_hex(3)}"
    env_file = workdir / "stack.env"
    # Compose reads this for the files' variables, and passes it to the services (LUNA_ENV_FILE).
    _write_env(
        env_file,
        {
            "COMPOSE_PROJECT_NAME": project,
            "LUNA_TOKEN": token,
            "LUNA_REDIS_PASSWORD": password,
            "LUNA_IMAGE": IMAGE,
            "LUNA_REDIS_IMAGE": REDIS_IMAGE,
            "LUNA_MODELS_DIR": str(models),
            "LUNA_ENV_FILE": str(env_file),
            **{f"LUNA_PUBLISH_PORT_{name.upper()}": str(port) for name, port in ports.items()},
            "LUNA_CLIP_PRELOAD": CLIP_MODEL,
            "LUNA_VAE_PRELOAD": VAE_MODEL,
            "LUNA_UNET_PRELOAD": UNET_MODEL,
            # Take over a dead replica's job after 3 s (default 30 s); registry entries live 3 s.
            "LUNA_CLAIM_IDLE_MS": "3000",
            "LUNA_HEARTBEAT_S": "1",
        },
    )
    compose = DockerCompose(
        COMPOSE_DIR,
        compose_file_name=COMPOSE_FILES,
        env_file=str(env_file),
        wait=True,
        docker_command_path=DOCKER_CLI,
    )
    redis_url = f"redis://:{password}@127.0.0.1:{ports['redis']}/0"
    stack = Stack(compose, project, ports, token, redis_url, models, docker.from_env(timeout=60))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPOSE_PROJECT_NAME", project)
        mp.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")  # its image is on a registry
        start = time.monotonic()
        try:
            compose.start()  # up --wait: every healthcheck passes
        except subprocess.CalledProcessError as exc:
            logs = stack.logs()
            compose.stop()
            pytest.fail(f"compose up failed: {exc.stderr!r}\n{logs}")
        stack.timings["up_s"] = time.monotonic() - start
        try:
            yield stack
        finally:
            if path := os.environ.get("LUNA_COMPOSE_LOGS"):
                with contextlib.suppress(subprocess.CalledProcessError):
                    Path(path).write_text("".join(compose.get_logs()))
            start = time.monotonic()
            compose.stop()  # down --volumes
            stack.timings.setdefault("down_s", time.monotonic() - start)
            if path := os.environ.get("LUNA_COMPOSE_TIMINGS"):
                Path(path).write_text(json.dumps({k: round(v, 1) for k, v in stack.timings.items()}))


def _latent(seed: int, size: int = 8) -> torch.Tensor:
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_decode(stack: Stack, latent: torch.Tensor) -> torch.Tensor:
    vae = reference_vae(stack.models / "vae" / VAE_MODEL, "")
    with torch.inference_mode():
        return torch.clamp((vae.decode(latent).sample.float() + 1) / 2, 0, 1).movedim(1, -1)


def _listening_addresses() -> dict[int, set[str]]:
    """TCP ports in LISTEN on this host (the containers share its network) and the addresses they bind."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":
                address, port = local.split(":")
                found.setdefault(int(port, 16), set()).add(address)
    return found


async def _job_info(stack: Stack, job_id: str) -> dict[str, str]:
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        raw = await redis.hgetall(f"luna:job:{job_id}")
    finally:
        await redis.aclose()
    return {k.decode(): v.decode() for k, v in raw.items()}


async def _wait_running(stack: Stack, job_id: str) -> str:
    """Wait until a replica runs the job; returns that replica's consumer name."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = await _job_info(stack, job_id)
        if info.get("state") == "running":
            return info["worker"]
        await asyncio.sleep(0.02)
    pytest.fail(f"job {job_id} never ran: {await _job_info(stack, job_id)}")


def _wait_restarted_and_healthy(stack: Stack, service: str, restarts: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        attrs = stack.container(service).attrs
        if attrs["RestartCount"] > restarts and attrs["State"].get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(0.5)
    pytest.fail(f"{service} not restarted and healthy after {TIMEOUT_S} s:\n{stack.logs()}")


# ----------------------------------------------------------------------------------------- the stack


async def test_stack_is_up_healthy_on_loopback_with_a_redis_password(stack: Stack) -> None:
    for service in ("redis", *KINDS):
        container = stack.container(service)
        config = container.attrs["HostConfig"]
        assert container.status == "running" and container.attrs["State"]["Health"]["Status"] == "healthy"
        assert config["NetworkMode"] == "host" and not config.get("DeviceRequests")
        assert config["RestartPolicy"]["Name"] == "unless-stopped"
    [models] = [m for m in stack.container("vae").attrs["Mounts"] if m["Destination"] == "/models"]
    assert models["Type"] == "bind" and models["RW"] is False and models["Source"] == str(stack.models)

    # Every port of the stack is bound to 127.0.0.1 and nothing else (IPv4 loopback in /proc: 0100007F).
    listening = _listening_addresses()
    for name, port in stack.ports.items():
        assert listening.get(port) == {"0100007F"}, f"{name} listens on {listening.get(port)}"

    for kind in KINDS:
        async with stack.client(kind) as client:
            status = await client.status()
        assert status["service"] == kind and status["ready"] is True and status["redis"] is True
        assert status["device"] == "cpu"

    no_password = aioredis.Redis(host="127.0.0.1", port=stack.ports["redis"])
    try:
        with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
            await no_password.ping()
    finally:
        await no_password.aclose()
    with_password = aioredis.Redis.from_url(stack.redis_url)
    try:
        assert await with_password.ping() is True
    finally:
        await with_password.aclose()
    # The password is in no command line: not in the container's command, not in the running server's.
    redis = stack.container("redis")
    password = stack.redis_url.split(":")[2].split("@")[0]
    assert password not in " ".join(redis.attrs["Config"]["Cmd"])
    assert password.encode() not in Path(f"/proc/{redis.attrs['State']['Pid']}/cmdline").read_bytes()


async def test_every_service_refuses_requests_without_the_token(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        for kind in KINDS:
            url = stack.url(kind)
            async with session.get(f"{url}/health/ready") as response:
                assert response.status == 200  # health needs no token
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                for method, path in (("GET", "/v1/status"), ("POST", f"/v1/{kind}/load")):
                    async with session.request(method, url + path, headers=headers, json={}) as response:
                        assert response.status == 401, (kind, path, headers)
                        assert (await response.json())["error"]["code"] == "unauthorized"


async def test_vae_decode_and_encode_through_the_container(stack: Stack) -> None:
    latent = _latent(0)
    async with stack.client("vae") as vae:
        out, params = await vae.call("decode", {"latent": latent}, {"model": VAE_MODEL})
        image = out["image"]
        assert params["model"] == f"vae/{VAE_MODEL}"
        assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1 and image.std() > 1e-3
        torch.testing.assert_close(image, _reference_decode(stack, latent), rtol=1e-5, atol=1e-5)

        encoded, _ = await vae.call("encode", {"image": image}, {"model": VAE_MODEL})
        assert encoded["latent"].shape == (1, 4, 8, 8) and torch.isfinite(encoded["latent"]).all()


async def test_clip_encode_then_a_unet_step_then_a_decode(stack: Stack) -> None:
    async with stack.client("clip") as clip, stack.client("unet") as unet, stack.client("vae") as vae:
        cond, info = await clip.call("encode", params={"model": CLIP_MODEL, "text": "a lighthouse at dusk"})
        assert cond["cond"].shape == (1, 77, 32) and cond["pooled"].shape == (1, 32)
        assert torch.isfinite(cond["cond"]).all() and info["chunks"] == 1
        again, _ = await clip.call("encode", params={"model": CLIP_MODEL, "text": "a lighthouse at dusk"})
        assert torch.equal(again["cond"], cond["cond"])
        # ComfyUI's weighting: weight 1 is the plain prompt, another weight moves the conditioning.
        same, _ = await clip.call(
            "encode", params={"model": CLIP_MODEL, "text": "(a lighthouse:1.0) at dusk"}
        )
        torch.testing.assert_close(same["cond"], cond["cond"], rtol=0, atol=1e-5)
        weighted, _ = await clip.call(
            "encode", params={"model": CLIP_MODEL, "text": "(a lighthouse:1.5) at dusk"}
        )
        assert (weighted["cond"] - cond["cond"]).abs().max() > 1e-3
        empty, _ = await clip.call("encode", params={"model": CLIP_MODEL, "text": ""})

        # One CFG step, cond and uncond rows together, as ComfyUI sends it.
        inputs = {
            "x": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1),
            "timesteps": torch.tensor([500.0, 500.0]),
            "context": torch.cat([cond["cond"], empty["cond"]]),
        }
        out, params = await unet.call("step", inputs, {"model": UNET_MODEL})
        assert params["model"] == f"unet/{UNET_MODEL}"
        assert out["out"].shape == inputs["x"].shape and torch.isfinite(out["out"]).all()
        assert (out["out"][0] - out["out"][1]).abs().max() > 1e-4  # the prompt matters
        reference = reference_unet(ldm_unet(stack.models / "unet" / UNET_MODEL), "sd15")
        torch.testing.assert_close(out["out"], reference_step(reference, inputs), rtol=1e-4, atol=1e-4)

        image, _ = await vae.call("decode", {"latent": out["out"][:1]}, {"model": VAE_MODEL})
        assert image["image"].shape == (1, 64, 64, 3) and torch.isfinite(image["image"]).all()


async def test_queued_jobs_through_redis_and_through_http(stack: Stack) -> None:
    latents = [_latent(seed) for seed in (10, 11, 12)]
    async with stack.client("vae") as direct, stack.queue_client("vae") as queued:
        expected = [
            (await direct.call("decode", {"latent": t}, {"model": VAE_MODEL}))[0]["image"] for t in latents
        ]
        via_redis = [await queued.submit("decode", {"latent": t}, {"model": VAE_MODEL}) for t in latents]
        via_http = await direct.submit("decode", {"latent": latents[0]}, {"model": VAE_MODEL})
        # Queued jobs meet in the batcher: a batched decode matches the lone one to rounding.
        for job_id, image in zip(via_redis, expected, strict=True):
            out, params = await queued.wait(job_id, timeout_s=TIMEOUT_S)
            assert params["model"] == f"vae/{VAE_MODEL}"
            torch.testing.assert_close(out["image"], image, rtol=1e-5, atol=1e-5)
        out, _ = await direct.wait(via_http, timeout_s=TIMEOUT_S)
        torch.testing.assert_close(out["image"], expected[0], rtol=1e-5, atol=1e-5)
    for job_id in via_redis:
        info = await _job_info(stack, job_id)
        assert info["state"] == "done" and info["attempts"] == "1"


# ------------------------------------------------------------------------------------ failure and recovery


async def _kill_mid_job_and_recover(stack: Stack, kill, bring_back) -> None:
    """Queue a slow decode, kill the vae replica running it, queue more while it is down, bring it back:
    the restarted replica takes the job over (XAUTOCLAIM after LUNA_CLAIM_IDLE_MS) and runs the rest."""
    slow = _latent(20, SLOW_LATENT)
    small = [_latent(seed) for seed in (21, 22)]
    async with stack.queue_client("vae") as queued:
        job_id = await queued.submit("decode", {"latent": slow}, {"model": VAE_MODEL})
        dead_worker = await _wait_running(stack, job_id)
        kill(stack.container("vae"))
        later = [await queued.submit("decode", {"latent": t}, {"model": VAE_MODEL}) for t in small]
        assert (await _job_info(stack, job_id))["state"] == "running"  # still held by the dead replica
        await asyncio.to_thread(bring_back)
        out, _ = await queued.wait(job_id, timeout_s=TIMEOUT_S)
        rest = [(await queued.wait(j, timeout_s=TIMEOUT_S))[0]["image"] for j in later]
    info = await _job_info(stack, job_id)
    assert info["state"] == "done" and info["attempts"] == "2" and info["worker"] != dead_worker
    assert out["image"].shape == (1, 8 * SLOW_LATENT, 8 * SLOW_LATENT, 3)
    torch.testing.assert_close(out["image"], _reference_decode(stack, slow), rtol=1e-5, atol=1e-5)
    for latent, image in zip(small, rest, strict=True):
        torch.testing.assert_close(image, _reference_decode(stack, latent), rtol=1e-5, atol=1e-5)
    async with stack.client("vae") as vae:
        status = await vae.status()
    assert status["ready"] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="killing a container's process as a crash does needs root")
async def test_a_crashed_service_is_restarted_and_its_running_job_taken_over(stack: Stack) -> None:
    restarts = stack.container("vae").attrs["RestartCount"]

    def crash(container) -> None:
        # What an out-of-memory kill or a segfault does: the process dies, the engine did not stop it.
        os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)

    def restart_policy() -> None:  # nothing to do but wait: the engine restarts it (unless-stopped)
        _wait_restarted_and_healthy(stack, "vae", restarts)

    start = time.monotonic()
    await _kill_mid_job_and_recover(stack, crash, restart_policy)
    stack.timings["crash_recovery_s"] = time.monotonic() - start
    assert stack.container("vae").attrs["RestartCount"] == restarts + 1


async def test_docker_kill_stops_a_service_until_compose_brings_it_back_with_its_job(stack: Stack) -> None:
    restarts = stack.container("vae").attrs["RestartCount"]

    def docker_kill(container) -> None:
        subprocess.run([DOCKER_CLI, "kill", container.id], check=True, capture_output=True, timeout=60)

    def compose_up() -> None:
        # For Docker, `docker kill` is a manual stop: no restart policy brings the container back.
        time.sleep(3)
        container = stack.container("vae")
        assert container.status == "exited" and container.attrs["RestartCount"] == restarts
        stack.compose.start()  # up --wait starts what is stopped and waits for its health

    start = time.monotonic()
    await _kill_mid_job_and_recover(stack, docker_kill, compose_up)
    stack.timings["kill_recovery_s"] = time.monotonic() - start
    assert stack.container("vae").status == "running"


def test_compose_down_removes_every_container_and_volume(stack: Stack) -> None:
    start = time.monotonic()
    stack.compose.stop()  # down --volumes
    stack.timings["down_s"] = time.monotonic() - start
    label = f"com.docker.compose.project={stack.project}"
    assert stack.engine.containers.list(all=True, filters={"label": label}) == []
    assert stack.engine.volumes.list(filters={"label": label}) == []
    listening = _listening_addresses()
    assert not set(stack.ports.values()) & set(listening)
