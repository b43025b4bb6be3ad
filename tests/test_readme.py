"""The README stays true: its client example runs against the demo models (real services on 127.0.0.1,
the same files `luna-stack run --demo` writes) and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from luna_stack.clip.family import build as build_clip
from luna_stack.unet.family import build as build_unet
from luna_stack.vae.family import build as build_vae
from luna_stack.wire.contract import DEFAULT_PORTS

from .conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(
    r"<!-- readme-example:start[^>]*-->\n```python\n(.*?)```\n<!-- readme-example:end -->", re.S
)


def test_readme_client_example_runs_against_the_demo_models(models_dir: Path, start_service) -> None:
    [code] = EXAMPLE.findall((ROOT / "README.md").read_text())
    for kind, build in (("clip", build_clip), ("unet", build_unet), ("vae", build_vae)):
        service = start_service(build, make_settings(models_dir))
        default = f"http://127.0.0.1:{DEFAULT_PORTS[kind]}"
        assert default in code
        code = code.replace(default, service.url)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().splitlines() == ["torch.Size([1, 77, 32])", "torch.Size([1, 64, 64, 3])"]
    shown = [line.split("# ")[1] for line in code.splitlines() if "print(" in line]
    assert shown[0].startswith("[1, 77, 32]") and shown[1].startswith("[1, 64, 64, 3]")
