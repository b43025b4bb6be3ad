"""Configuration: YAML + environment, validation messages that say what to fix, README kept true."""

from __future__ import annotations

from pathlib import Path

import pytest

from luna_stack.config import load_settings, settings_table
from luna_stack.vae.settings import VaeSettings
from luna_stack.wire.errors import ConfigError
from tools.update_readme import render

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_bind_loopback() -> None:
    settings = load_settings(None, env={})
    assert settings.core.host == "127.0.0.1"
    assert settings.core.token is None
    assert settings.of(VaeSettings).max_batch == 8


def test_yaml_then_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "luna.yaml"
    cfg.write_text("port: 9000\nmodel_roots: [/a, /b]\nvae:\n  max_batch: 3\n  preload: [x.safetensors]\n")
    settings = load_settings(cfg, env={"LUNA_VAE_MAX_BATCH": "5", "LUNA_MODEL_ROOTS": "/m1:/m2"})
    assert settings.core.port == 9000
    assert settings.core.model_roots == ["/m1", "/m2"]
    vae = settings.of(VaeSettings)
    assert vae.max_batch == 5  # the environment wins
    assert vae.preload == ["x.safetensors"]


def test_config_path_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dtype: fp16\n")
    assert load_settings(None, env={"LUNA_CONFIG": str(cfg)}).core.dtype == "fp16"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LUNA_PORT": "eighty"}, "port must be a int"),
        ({"LUNA_PORT": "70000"}, "port must be <= 65535"),
        ({"LUNA_DTYPE": "fp64"}, "dtype must be one of auto, fp32, fp16, bf16"),
        ({"LUNA_VAE_MAX_BATCH": "0"}, "vae.max_batch must be >= 1"),
        ({"LUNA_HOST": "0.0.0.0"}, "no token is set"),
        ({"LUNA_DEVICE": "tpu"}, "device must be auto, cpu, cuda"),
        ({"LUNA_VAE_LOAD_ON_DEMAND": "perhaps"}, "vae.load_on_demand must be a bool"),
    ],
)
def test_invalid_values_say_what_to_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(None, env=env)
    assert "LUNA_" in str(info.value) or "token" in str(info.value)


def test_remote_bind_with_token_is_allowed() -> None:
    settings = load_settings(None, env={"LUNA_HOST": "0.0.0.0", "LUNA_TOKEN": "s3cret"})
    assert settings.core.host == "0.0.0.0"


def test_unknown_keys_and_bad_files(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown config key prot"):
        load_settings(cfg, env={})
    cfg.write_text("vae:\n  max_bach: 2\n")
    with pytest.raises(ConfigError, match=r"vae\.max_bach"):
        load_settings(cfg, env={})
    cfg.write_text("port: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_readme_configuration_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, (
        "README's generated tables (configuration, demo models) are stale: run python tools/update_readme.py"
    )
    for row in settings_table().splitlines()[2:]:
        assert row in readme
