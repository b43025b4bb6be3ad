"""The package tree is the architecture: each layer imports only the layers below it (read from the
source), and what a ComfyUI process or a client loads stays free of server and model code (read from
sys.modules of a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "services"  # imported as luna_stack

# What each runtime package may import from luna_stack (itself always). devtools and cli sit on top.
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "config": {"wire"},
    "jobs": {"wire"},
    "weights": {"wire"},
    "lora": {"wire", "weights"},
    "gpu": {"wire", "config", "lora"},
    "client": {"wire", "gpu", "jobs"},
    "server": {"wire", "config", "gpu", "jobs", "weights"},
    "vae": {"wire", "config", "gpu", "weights", "server"},
    "unet": {"wire", "config", "gpu", "weights", "lora", "server"},
    "clip": {"wire", "config", "gpu", "weights", "lora", "server", "jobs"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "luna_stack" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if layer in ("devtools", "cli", "__init__") or path.name == "__main__.py":  # entry points
            continue
        assert layer in ALLOWED, f"{path.relative_to(ROOT)}: package {layer!r} has no place in the layering"
        for used in _imported_layers(path) - {layer}:
            if used not in ALLOWED[layer]:
                violations.append(f"{path.relative_to(ROOT)} imports luna_stack.{used}")
    assert violations == []


def test_no_runtime_module_and_no_pack_module_imports_the_devtools() -> None:
    runtime = [p for p in PACKAGE.rglob("*.py") if _layer(p) not in ("devtools", "cli")]
    pack = list((ROOT / "comfy_nodes").rglob("*.py"))
    users = [str(p.relative_to(ROOT)) for p in runtime + pack if "devtools" in _imported_layers(p)]
    assert users == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


HEAVY = ("aiohttp.web", "diffusers", "transformers", "prometheus_client")


@pytest.mark.parametrize(
    ("statement", "forbidden"),
    [
        ("import comfy_nodes", (*HEAVY, "luna_stack.server", "luna_stack.devtools", "luna_stack.lora")),
        ("import luna_stack.client.http", (*HEAVY, "luna_stack.server", "luna_stack.devtools")),
        (
            "from luna_stack.wire import codec, contract, errors, ipc, keys, tensors",
            (*HEAVY, "aiohttp", "redis", "luna_stack.server", "luna_stack.client"),
        ),
    ],
)
def test_client_side_imports_load_no_server_or_model_code(statement: str, forbidden: tuple[str, ...]) -> None:
    loaded = _loaded_after(statement)
    hits = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert hits == []


def test_every_service_is_a_family_of_the_one_contract() -> None:
    from luna_stack.server.family import ModelFamily
    from luna_stack.wire.contract import KINDS, OPS

    for kind in KINDS:
        module = __import__(f"luna_stack.{kind}.family", fromlist=["build"])
        families = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, ModelFamily)]
        family = next(f for f in families if f is not ModelFamily)
        assert family.kind == kind
        assert tuple(family.ops) == OPS[kind]  # the wire contract names the ops the family serves
        assert callable(module.build)


def test_the_wheel_lists_every_package_of_the_tree() -> None:
    """setuptools' explicit package list must name each folder of services/ (a missing one ships a wheel
    whose imports fail only in the containers)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {
        ".".join(("luna_stack", *p.parent.relative_to(PACKAGE).parts))
        for p in PACKAGE.rglob("__init__.py")
        if "data" not in p.parts
    }
    assert tree == listed
