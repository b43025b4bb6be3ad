"""Deployment checks that need no Docker engine.

Static: the compose files against the compose-spec schema, the Dockerfiles through hadolint, and the
properties the stack relies on, read from the merged compose model of every layout (GPU pinning,
CUDA IPC namespaces, read-only models, health checks, token and bind address).
Dynamic: each compose service's own command and environment, translated from the container to this
host (models mount -> a fixtures directory, redis host -> a local redis-server, 0.0.0.0 -> 127.0.0.1,
GPU -> CPU), runs as a local process and passes its own compose healthcheck; two vae replicas on one
Redis share the job queue, and a replica's LUNA_REPLICA_ADDRESS is what the registry advertises.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
import yaml

from luna_stack.client.http import AsyncClient
from luna_stack.jobs.queue import JobQueue
from luna_stack.jobs.redis import connect
from luna_stack.jobs.registry import Registry
from luna_stack.wire import codec
from tools import compose_yaml

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
BASE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMFYUI_FILE = COMPOSE_DIR / "docker-compose.comfyui.yml"
CPU_FILE = COMPOSE_DIR / "cpu.yml"
DOCKERFILES = sorted((REPO / "docker").glob("*Dockerfile*"))
# The images that run Python (the services, ComfyUI); the other one is Redis.
PYTHON_DOCKERFILES = [p for p in DOCKERFILES if "redis" not in p.name]
BIN = Path(sys.executable).parent  # the venv running the tests holds the tools and `luna-stack`
LUNA_KINDS = ("clip", "vae", "unet")
GPU_SERVICES = (*LUNA_KINDS, "comfyui")
TOKEN = "deploy-test-token"
REDIS_PASSWORD = "deploy-test-redis-password"
# What the user would put in compose/.env: the token and, for the local run, models to preload.
PRELOAD = {
    "LUNA_CLIP_PRELOAD": "clip_l.safetensors",
    "LUNA_VAE_PRELOAD": "sd15-small-vae.safetensors",
    "LUNA_UNET_PRELOAD": "sd15-small-unet.safetensors",
}
VAE_MODEL = PRELOAD["LUNA_VAE_PRELOAD"]
# layout -> (env files layered on compose/.env, expected physical GPU of each GPU service)
LAYOUTS = {
    "1gpu": ((), {"clip": "0", "vae": "0", "unet": "0", "comfyui": "0"}),
    "2gpu": (("2gpu.env",), {"clip": "1", "vae": "0", "unet": "0", "comfyui": "0"}),
}
READY_TIMEOUT_S = 240  # three services importing torch at once on two shared cores


# ------------------------------------------------------------------ a minimal compose model loader


class MissingVariable(Exception):
    pass


_NAME = re.compile(r"[A-Za-z_]\w*")
_BRACED = re.compile(r"(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.S)


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `${` whose body starts at `start` (defaults may nest `${...}`)."""
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def _substitute(text: str, env: Mapping[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            m = _BRACED.fullmatch(text[i + 2 : end])
            assert m, f"bad variable {text[i : end + 1]!r}"
            name, op, arg = m["name"], m["op"], m["arg"]
            current = env.get(name)
            unset = current is None or (current == "" and op is not None and op.startswith(":"))
            if op and op.endswith("?") and unset:
                raise MissingVariable(f"{name}: {arg}")
            out.append(_substitute(arg, env) if op and op.endswith("-") and unset else current or "")
            i = end + 1
        elif text[i] == "$" and (m := _NAME.match(text, i + 1)):
            out.append(env.get(m[0], ""))
            i = m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    defaults holding variables themselves (${A:-x${B}y})."""
    if isinstance(value, dict):
        return type(value)({k: interpolate(v, env) for k, v in value.items()})
    if isinstance(value, list):
        return type(value)(interpolate(v, env) for v in value)
    if not isinstance(value, str):
        return value
    return _substitute(value, env)


def variables_used(text: str) -> set[str]:
    """Every variable a compose file reads, nested defaults included ($$ is an escaped dollar)."""
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{(\w+)", text)) | set(re.findall(r"\$([A-Za-z_]\w*)", text))


def _environment_dict(environment: Any) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {k: "" if v is None else str(v) for k, v in (environment or {}).items()}


def merge(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """Compose's merge rules: mappings merge, sequences append, command/entrypoint/healthcheck.test are
    replaced, environment merges by variable name; `!override` replaces, `!reset` drops the key."""
    if isinstance(override, (compose_yaml.Override, compose_yaml.OverrideList)):
        return compose_yaml.plain(override)
    if len(path) == 3 and path[0] == "services" and path[2] == "environment":
        return {**_environment_dict(base), **_environment_dict(override)}
    if path[-1:] in (("command",), ("entrypoint",)) or path[-2:] == ("healthcheck", "test"):
        return override
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is compose_yaml.RESET:
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value, (*path, key)) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def load_project(files: list[Path], env: Mapping[str, str]) -> dict[str, Any]:
    """The merged, interpolated compose model (what `docker compose config` prints)."""
    project: dict[str, Any] = {}
    for file in files:
        raw = compose_yaml.load(file)  # anchors and `<<` merge keys resolve here, !reset is marked
        body = {k: v for k, v in raw.items() if not k.startswith("x-")}
        project = merge(project, interpolate(body, env))
    project = compose_yaml.plain(project)  # what only a first file resets is not in the model either
    for service in project["services"].values():
        service["environment"] = _environment_dict(service.get("environment"))
    return project


def layout_env(layout: str, **extra: str) -> dict[str, str]:
    env_files, _ = LAYOUTS[layout]
    env: dict[str, str] = {"LUNA_TOKEN": TOKEN, "LUNA_REDIS_PASSWORD": REDIS_PASSWORD}
    for name in env_files:
        env.update(read_env_file(COMPOSE_DIR / name))
    return {**env, **extra}


def project_files(with_comfyui: bool) -> list[Path]:
    return [BASE_FILE, COMFYUI_FILE] if with_comfyui else [BASE_FILE]


def compose_files() -> list[Path]:
    return sorted(COMPOSE_DIR.glob("*.yml"))


# ------------------------------------------------------------------------------ static checks


def test_compose_files_validate_against_the_compose_spec() -> None:
    files = compose_files()
    assert {BASE_FILE, COMFYUI_FILE, CPU_FILE} <= set(files)
    result = subprocess.run(
        [sys.executable, "-m", "tools.compose_yaml", *files],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_sees_compose_tags_resolved(tmp_path: Path) -> None:
    """check-jsonschema alone cannot read `!reset`; the wrapper drops reset keys and still catches errors."""
    good = tmp_path / "good.yml"
    good.write_text("services:\n  vae:\n    deploy: !reset {}\n    network_mode: host\n")
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  vae:\n    deploy: !reset {}\n    ipc: [1]\n")
    run = [sys.executable, "-m", "tools.compose_yaml"]
    assert subprocess.run([*run, good], capture_output=True, timeout=120, cwd=REPO).returncode == 0
    result = subprocess.run([*run, bad], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1 and "ipc" in result.stdout


def test_dockerfiles_pass_hadolint() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "comfyui.Dockerfile"}
    result = subprocess.run(
        [BIN / "hadolint", *DOCKERFILES], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_justified() -> None:
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if match := re.match(r"#\s*hadolint ignore=([\w,]+)", line):
                comment = "\n".join(lines[max(0, i - 4) : i])
                for rule in match[1].split(","):
                    assert f"{rule}:" in comment, (
                        f"{dockerfile.name}:{i + 1}: {rule} ignored without a reason"
                    )


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)


def _base_images(instructions: list[tuple[str, str]]) -> list[str]:
    """The images the stages start from, build arguments at their defaults, stage names left out."""
    defaults = _arg_defaults(instructions)
    stages, images = set(), []
    for ins, args in instructions:
        if ins != "FROM":
            continue
        words = args.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], words[0])
        if image not in stages:
            images.append(image)
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    return images


def _bind_mount_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Build-context paths that RUN steps bind-mount (mounts from a stage or image left out)."""
    sources = []
    for ins, args in instructions:
        for mount in re.findall(r"--mount=(\S+)", args) if ins == "RUN" else []:
            options = dict(o.split("=", 1) if "=" in o else (o, "") for o in mount.split(","))
            if options.get("type") == "bind" and "from" not in options:
                sources.append(options.get("source", "."))
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_versions_and_runs_unprivileged(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    images = _base_images(instructions)
    assert images
    for base in images:
        tag = base.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"base image {base!r} is not pinned"
    users = [a for ins, a in instructions if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(ins == "HEALTHCHECK" for ins, _ in instructions)


@pytest.mark.parametrize("dockerfile", PYTHON_DOCKERFILES, ids=lambda p: p.name)
def test_python_images_pin_torch_and_stay_offline(dockerfile: Path) -> None:
    instructions = _dockerfile_instructions(dockerfile)
    args = _arg_defaults(instructions)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    env = " ".join(a for ins, a in instructions if ins == "ENV")
    assert "HF_HUB_OFFLINE=1" in env


def test_service_image_defaults_to_cuda_and_installs_wheels_from_a_bind_mount_only() -> None:
    """BASE_IMAGE and PIP_FROM change the build; by default it is the CUDA image from the indexes. The
    offline install reads .whl/ through a BuildKit bind mount: no COPY or ADD puts wheels in a layer."""
    instructions = _dockerfile_instructions(REPO / "docker" / "Dockerfile")
    args = _arg_defaults(instructions)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and args["PIP_FROM"] == "index"
    stages = {a.split()[-1] for ins, a in instructions if ins == "FROM" and " AS " in a.upper()}
    assert {"deps-index", "deps-wheels"} <= stages
    assert ("FROM", "deps-${PIP_FROM}") in instructions
    assert _bind_mount_sources(instructions) == [".whl"]
    for ins, a in instructions:
        if ins in ("COPY", "ADD"):
            assert ".whl" not in a, f"{ins} {a} puts wheels into a layer"


def test_service_image_healthcheck_is_the_compose_healthcheck() -> None:
    instructions = _dockerfile_instructions(REPO / "docker" / "Dockerfile")
    [healthcheck] = [a for ins, a in instructions if ins == "HEALTHCHECK"]
    image_test = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    project = load_project([BASE_FILE], layout_env("1gpu"))
    for kind in LUNA_KINDS:
        assert project["services"][kind]["healthcheck"]["test"] == ["CMD", *image_test]


def test_docker_build_context_holds_what_the_dockerfiles_copy() -> None:
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    for dockerfile in DOCKERFILES:
        instructions = _dockerfile_instructions(dockerfile)
        for source in _bind_mount_sources(instructions):
            # Mounted only when that stage is built (.whl/ holds the wheels of an offline build).
            assert source == "." or source.rstrip("/") in allowed, (
                f"{dockerfile.name} mounts {source}, excluded by .dockerignore"
            )
        for ins, args in instructions:
            if ins == "COPY" and not args.startswith("--from="):
                for source in args.split()[:-1]:
                    assert source.rstrip("/") in allowed, (
                        f"{dockerfile.name} copies {source}, excluded by .dockerignore"
                    )
                    assert (REPO / source).exists(), (
                        f"{dockerfile.name} copies {source}, which does not exist"
                    )


@pytest.mark.parametrize("files", [[BASE_FILE], [BASE_FILE, CPU_FILE]], ids=["gpu", "cpu"])
def test_compose_refuses_to_start_without_a_token_or_a_redis_password(files: list[Path]) -> None:
    with pytest.raises(MissingVariable, match="LUNA_TOKEN"):
        load_project(files, {"LUNA_REDIS_PASSWORD": REDIS_PASSWORD})
    with pytest.raises(MissingVariable, match="LUNA_TOKEN"):
        load_project(files, {"LUNA_TOKEN": "", "LUNA_REDIS_PASSWORD": REDIS_PASSWORD})
    for env in ({"LUNA_TOKEN": TOKEN}, {"LUNA_TOKEN": TOKEN, "LUNA_REDIS_PASSWORD": ""}):
        with pytest.raises(MissingVariable, match="LUNA_REDIS_PASSWORD"):
            load_project(files, env)
    # Not even with a Redis URL of one's own: the stack's Redis still needs its password.
    with pytest.raises(MissingVariable, match="LUNA_REDIS_PASSWORD"):
        load_project(files, {"LUNA_TOKEN": TOKEN, "LUNA_REDIS_URL": "redis://:x@elsewhere:6379/0"})


def test_env_example_documents_every_variable() -> None:
    example = (COMPOSE_DIR / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    used = set()
    for file in compose_files():
        used |= variables_used(file.read_text())
    for _, (env_files, _) in LAYOUTS.items():
        for name in env_files:
            used |= set(read_env_file(COMPOSE_DIR / name))
    assert used - documented == set(), "variables missing from compose/.env.example"


@pytest.mark.parametrize("with_comfyui", [False, True], ids=["services", "with-comfyui"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_stack_properties(layout: str, with_comfyui: bool, tmp_path: Path) -> None:
    models = tmp_path / "models"
    project = load_project(project_files(with_comfyui), layout_env(layout, LUNA_MODELS_DIR=str(models)))
    services = project["services"]
    expected_gpus = LAYOUTS[layout][1]
    assert set(services) == {"redis", *LUNA_KINDS, *(["comfyui"] if with_comfyui else [])}

    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host by default"

    redis = services["redis"]
    assert _redis_option(redis, "--appendonly") == "yes"
    assert _redis_password(redis) == REDIS_PASSWORD
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in project["volumes"]

    for name in GPU_SERVICES:
        if name not in services:
            continue
        service = services[name]
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert device["device_ids"] == [expected_gpus[name]], f"{name} on the wrong GPU"
        # CUDA IPC between a client and a service on the same GPU needs shared IPC and PID namespaces.
        assert service["ipc"] == "host" and service["pid"] == "host"
        [models_mount] = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
        assert models_mount["type"] == "bind" and models_mount["read_only"] is True
        assert models_mount["source"] == str(models)
        depends = service["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"

    for kind in LUNA_KINDS:
        service, env = services[kind], services[kind]["environment"]
        assert service["command"] == ["luna-stack", "serve", kind]
        # Reachable from other containers, hence bound to 0.0.0.0, hence a token (the service refuses
        # a non-loopback bind without one).
        assert env["LUNA_HOST"] == "0.0.0.0" and env["LUNA_TOKEN"] == TOKEN
        assert env["LUNA_MODEL_ROOTS"] == "/models"
        assert env["LUNA_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        assert env["HF_HUB_OFFLINE"] == "1"
        [port] = service["ports"]
        assert port.endswith(f":{env['LUNA_PORT']}")

    if with_comfyui:
        env = services["comfyui"]["environment"]
        assert env["LUNA_TOKEN"] == TOKEN
        assert env["LUNA_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        assert env["LUNA_SAMPLE_ON_HOST"] == "1"  # many instances on one GPU: sampling stays off it
        for kind in LUNA_KINDS:
            assert (
                env[f"LUNA_{kind.upper()}_URL"]
                == f"http://{kind}:{services[kind]['environment']['LUNA_PORT']}"
            )
            assert services["comfyui"]["depends_on"][kind]["condition"] == "service_healthy"


def _redis_option(redis: dict[str, Any], option: str) -> str:
    command = redis["command"]
    return command[command.index(option) + 1]


def _redis_password(redis: dict[str, Any]) -> str:
    """The requirepass redis-server gets: the command passes it from the environment, by name only."""
    command = redis["command"]
    assert command[:2] == ["sh", "-c"] and '--requirepass "$REDISCLI_AUTH"' in command[2]
    assert not any(REDIS_PASSWORD in part for part in command)
    return redis["environment"]["REDISCLI_AUTH"]


def test_cpu_layout_has_no_gpu_shares_the_host_network_and_binds_loopback(tmp_path: Path) -> None:
    models = tmp_path / "models"
    ports = {"redis": "16379", "clip": "18101", "vae": "18102", "unet": "18103"}
    env = layout_env(
        "1gpu",
        LUNA_MODELS_DIR=str(models),
        LUNA_IMAGE="luna-stack:ci",
        LUNA_REDIS_IMAGE="luna-stack-redis:ci",
        **{f"LUNA_PUBLISH_PORT_{name.upper()}": port for name, port in ports.items()},
    )
    services = load_project([BASE_FILE, CPU_FILE], env)["services"]
    assert set(services) == {"redis", *LUNA_KINDS}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        for reset in ("ports", "deploy", "ipc", "pid"):
            assert reset not in service, f"{name}: {reset} survives the CPU override"
        assert service["restart"] == "unless-stopped"

    redis = services["redis"]
    assert redis["image"] == "luna-stack-redis:ci"
    assert _redis_option(redis, "--bind") == "127.0.0.1" and _redis_option(redis, "--port") == ports["redis"]
    assert _redis_option(redis, "--appendonly") == "yes"
    assert _redis_password(redis) == REDIS_PASSWORD
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "-p", ports["redis"], "ping"]

    for kind in LUNA_KINDS:
        service, kind_env = services[kind], services[kind]["environment"]
        assert service["image"] == "luna-stack:ci" and service["command"] == ["luna-stack", "serve", kind]
        assert kind_env["LUNA_HOST"] == "127.0.0.1" and kind_env["LUNA_PORT"] == ports[kind]
        assert kind_env["LUNA_DEVICE"] == "cpu" and kind_env["LUNA_TOKEN"] == TOKEN
        assert kind_env["LUNA_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@127.0.0.1:{ports['redis']}/0"
        [models_mount] = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
        assert models_mount["source"] == str(models) and models_mount["read_only"] is True
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["interval"] == "3s"
        assert service["build"]["args"]["BASE_IMAGE"].startswith("debian:")
        assert "whl/cpu" in service["build"]["args"]["TORCH_INDEX_URL"]


def test_deploy_doc_gpu_table_matches_the_compose_layouts() -> None:
    """docs/deploy.md's layout table (service | 1gpu | 2gpu) says what the compose files do."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    rows = re.findall(r"^\|\s*`?(\w+)`?\s*\|\s*GPU (\d+)\s*\|\s*GPU (\d+)\s*\|", doc, re.MULTILINE)
    table = {name: {"1gpu": one, "2gpu": two} for name, one, two in rows}
    assert set(table) == set(GPU_SERVICES)
    for layout in LAYOUTS:
        services = load_project(project_files(True), layout_env(layout))["services"]
        for name in GPU_SERVICES:
            [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert device["device_ids"] == [table[name][layout]], f"docs/deploy.md: {name} in {layout}"


# ---------------------------------------------------- compose services as local processes


@dataclass
class LocalService:
    """A compose service run as a process on this host, with its healthcheck translated alongside."""

    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalService:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def healthy(self) -> bool:
        result = subprocess.run(self.healthcheck, env=self.env, capture_output=True, timeout=30)
        return result.returncode == 0

    def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        pytest.fail(f"{self.name} not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()  # what `docker compose down` sends first
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def _executable(name: str) -> str:
    if name == "python":
        return sys.executable
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert found, f"{name} is not installed on this host"
    return str(found)


def translate(
    name: str,
    service: dict[str, Any],
    workdir: Path,
    addresses: dict[str, str],
) -> LocalService:
    """The container's command, environment and healthcheck as a process on this host.

    What changes is only what the container boundary changes: bind mounts become their host paths,
    other services' `name:port` become their local addresses, 0.0.0.0 becomes 127.0.0.1 (the test
    binds loopback only), the container port becomes a free port, and the GPU becomes the CPU.
    """
    port = free_port()
    mounts = {v["target"]: v["source"] for v in service.get("volumes", []) if isinstance(v, dict)}
    env = dict(service.get("environment", {}))
    for key, value in env.items():
        value = mounts.get(value, value)
        for target, local in addresses.items():
            value = value.replace(target, local)
        env[key] = value
    if "LUNA_PORT" in env:
        env.update(LUNA_PORT=str(port), LUNA_HOST="127.0.0.1", LUNA_DEVICE="cpu")
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(workdir))

    argv = [_executable(service["command"][0]), *service["command"][1:]]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", f"{name}: healthcheck must be exec form"
    healthcheck = [_executable(test[1]), *test[2:]]
    if "redis-server" in service["command"]:
        # The container listens on 6379 with its data in the /data volume (the command passes its
        # arguments on to redis-server).
        argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
        healthcheck += ["-p", str(port)]
    return LocalService(name, argv, env, healthcheck, port, workdir / f"{name}.log")


@dataclass
class LocalStack:
    project: dict[str, Any]
    services: dict[str, LocalService]  # by compose service name
    vae_replica: LocalService  # a second vae replica, advertising another address
    advertised: str


@pytest.fixture(scope="module")
def local_stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Every service of compose/docker-compose.yml as a local process, plus a second vae replica for the
    scale-out test; all start together, so their start-up (importing torch) overlaps."""
    workdir = tmp_path_factory.mktemp("stack")
    project = load_project([BASE_FILE], layout_env("1gpu", LUNA_MODELS_DIR=str(models_dir), **PRELOAD))
    services = project["services"]
    running: dict[str, LocalService] = {}
    try:
        redis = translate("redis", services["redis"], workdir, {}).start()
        running["redis"] = redis
        redis.wait_healthy(30)
        addresses = {"redis:6379": f"127.0.0.1:{redis.port}"}
        for name in services:
            if name != "redis":
                running[name] = translate(name, services[name], workdir, addresses).start()
        # As on another host: it advertises an address other than its bind address (here a name that
        # still reaches it, so the test can use the advertised address).
        replica = translate("vae-2", services["vae"], workdir, addresses)
        advertised = f"localhost:{replica.port}"
        replica.env["LUNA_REPLICA_ADDRESS"] = advertised
        running["vae-2"] = replica.start()
        yield LocalStack(project, running, replica, advertised)
    finally:
        for service in reversed(running.values()):
            service.stop()


@pytest.mark.parametrize("name", list(yaml.safe_load(BASE_FILE.read_text())["services"]))
def test_compose_service_runs_locally_and_becomes_healthy(name: str, local_stack: LocalStack) -> None:
    service = local_stack.services[name]
    service.wait_healthy()
    if "LUNA_PORT" in service.env:
        # Healthy means ready: the preload list resident and Redis reachable; the compose token works.
        request = urllib.request.Request(
            f"http://127.0.0.1:{service.port}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            status = json.load(response)
        assert status["service"] == name and status["ready"] is True and status["redis"] is True
        preload = Path(PRELOAD[f"LUNA_{name.upper()}_PRELOAD"]).stem  # every service preloads one
        assert [preload in m["name"] for m in status["models"]] == [True], status["models"]


def _jobs_done(metrics_text: str) -> float:
    match = re.search(r'^luna_jobs_total\{outcome="done"\} (\S+)$', metrics_text, re.MULTILINE)
    return float(match[1]) if match else 0.0


async def _jobs_done_by(port: int) -> float:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        return _jobs_done(await response.text())


async def _wait_for_replicas(registry: Registry, count: int, timeout_s: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = await registry.replicas("vae")
        if len(replicas) == count or time.monotonic() > deadline:
            return replicas
        await asyncio.sleep(0.2)


async def test_two_vae_replicas_share_the_queue_and_advertise_their_address(local_stack: LocalStack) -> None:
    first, second, advertised = local_stack.services["vae"], local_stack.vae_replica, local_stack.advertised
    await asyncio.to_thread(first.wait_healthy)
    await asyncio.to_thread(second.wait_healthy)
    redis = connect(first.env["LUNA_REDIS_URL"])
    try:
        replicas = await _wait_for_replicas(Registry(redis), 2)
        assert sorted(r.address for r in replicas) == sorted([f"127.0.0.1:{first.port}", advertised])

        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        blob = codec.encode({"latent": latent}, {"model": VAE_MODEL})
        queue = JobQueue(redis, "vae")
        reference = None
        done = {"first": 0.0, "second": 0.0}
        for _round in range(8):  # until both replicas have taken jobs from the one stream
            job_ids = [await queue.submit("decode", blob) for _ in range(8)]
            for job_id in job_ids:
                tensors, params = codec.decode(await queue.result(job_id, timeout_s=120))
                assert params["model"] == f"vae/{VAE_MODEL}"
                assert tensors["image"].shape == (1, 64, 64, 3)
                reference = tensors["image"] if reference is None else reference
                torch.testing.assert_close(tensors["image"], reference)
            done = {"first": await _jobs_done_by(first.port), "second": await _jobs_done_by(second.port)}
            if all(done.values()):
                break
        assert all(done.values()), f"jobs per replica: {done}"
        assert (await queue.depth()) == {"waiting": 0, "running": 0}

        # The advertised address is where clients reach the replica: the registry entry serves.
        [entry] = [r for r in replicas if r.address == advertised]
        async with AsyncClient("vae", url=entry.url, token=TOKEN) as via_registry:
            tensors, _ = await via_registry.call("decode", {"latent": latent}, {"model": VAE_MODEL})
        torch.testing.assert_close(tensors["image"], reference)

        # Stopped the way compose stops it (SIGTERM), the replica withdraws from the registry.
        assert await asyncio.to_thread(second.stop) == 0, second.log_tail()
        remaining = await _wait_for_replicas(Registry(redis), 1)
        assert [r.address for r in remaining] == [f"127.0.0.1:{first.port}"]
    finally:
        await redis.aclose()
