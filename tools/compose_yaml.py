"""Compose files with compose's own YAML tags, for tools that only read plain YAML.

Compose (2.24+) reads `!reset` (drop what the files before set: the key goes back to its default) and
`!override` (replace instead of merging). PyYAML and check-jsonschema reject unknown tags, so this module
loads a file with them resolved: `load()` marks a reset value with RESET (the merge in
tests/test_deploy.py drops the key), and `plain()` drops reset keys and keeps override values, the file as
the compose-spec schema sees it.

    python -m tools.compose_yaml compose/*.yml    # check-jsonschema --builtin-schema vendor.compose-spec

validates every file that way (`make lint` runs it; each file is written as JSON to a temporary folder
first, so the report names `<file>.json`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


class _Reset:
    def __repr__(self) -> str:
        return "RESET"


RESET = _Reset()


class Override(dict):
    """A mapping tagged `!override`: it replaces the earlier files' value instead of merging with it."""


class OverrideList(list):
    """A sequence tagged `!override`: it replaces the earlier files' sequence instead of extending it."""


class _Loader(yaml.SafeLoader):
    pass


def _override(loader: _Loader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return OverrideList(loader.construct_sequence(node, deep=True))
    return loader.construct_scalar(node)  # a scalar replaces the earlier one anyway


_Loader.add_constructor("!reset", lambda loader, node: RESET)
_Loader.add_constructor("!override", _override)


def load(path: Path) -> Any:
    """The file's YAML (anchors and `<<` merge keys resolved) with `!reset` values as RESET."""
    return yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader with two tags added


def plain(value: Any) -> Any:
    """The same document without compose's tags: reset keys dropped, override values as plain values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [plain(v) for v in value if v is not RESET]
    return value


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv]
    if not files:
        print("usage: python -m tools.compose_yaml FILE.yml ...", file=sys.stderr)
        return 2
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema"
    )
    if checker is None:
        print("check-jsonschema is not installed (pip install check-jsonschema)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        converted = []
        for file in files:
            out = Path(tmp) / f"{file.name}.json"
            out.write_text(json.dumps(plain(load(file))))
            converted.append(str(out))
        result = subprocess.run(
            [checker, "--builtin-schema", "vendor.compose-spec", *converted], check=False, timeout=120
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
