"""One confinement for every model kind: symlinks leaving the roots refused (embeddings included), symlink
loops and over-long names answered 4xx, `available` only what loads, and no host path in any answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import aiohttp
import pytest
import torch
from safetensors.torch import save_file

from luna_stack.clip.embeddings import EmbeddingStore
from luna_stack.clip.family import build as build_clip
from luna_stack.vae.family import build as build_vae
from luna_stack.weights.paths import FOLDERS, ModelRoots
from luna_stack.wire.errors import BadRequest, LunaError, PathNotAllowed, UnknownModel

from .conftest import make_settings

VAE = "vae/sd15-small-vae.safetensors"
CLIP = "clip/clip_l.safetensors"
LONG_NAME = "x" * 300


def _tensor_file(path: Path, width: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": torch.randn(2, width), "clip_g": torch.randn(2, 64)}, str(path))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[ModelRoots, Path, Path]:
    """(roots, root, outside): every folder holds a good file, a symlink out of the roots, a symlink
    loop, a dangling link, and a folder linked from outside."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    secret = _tensor_file(outside / "secret.safetensors")
    _tensor_file(outside / "shelf" / "more.safetensors")
    for folder in FOLDERS:
        base = root / folder
        _tensor_file(base / "good.safetensors")
        (base / "evil.safetensors").symlink_to(secret)
        (base / "loop.safetensors").symlink_to(base / "loop.safetensors")
        (base / "dangling.safetensors").symlink_to(base / "gone.safetensors")
        (base / "shelf").symlink_to(outside / "shelf", target_is_directory=True)
        (base / "folder.safetensors").mkdir()
    (root / "vae" / "alias.safetensors").symlink_to(root / "checkpoints" / "good.safetensors")
    return ModelRoots([root]), root, outside


def _no_host_path(exc: LunaError, *paths: Path) -> None:
    text = json.dumps(exc.to_json())
    for path in paths:
        assert str(path) not in text, text


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_model_kind_refuses_symlinks_that_leave_the_roots(tree, folder: str) -> None:
    roots, root, outside = tree
    find = EmbeddingStore(roots).find if folder == "embeddings" else (lambda n: roots.resolve(n, [folder]))
    assert find("good") == root / folder / "good.safetensors"
    for name in ("evil", "evil.safetensors", "shelf/more.safetensors", "shelf/more"):
        with pytest.raises(PathNotAllowed, match="outside the model roots") as err:
            find(name)
        assert err.value.status == 403
        _no_host_path(err.value, root, outside)


def test_embedding_symlinked_outside_is_not_loaded(tree) -> None:
    roots, _root, _outside = tree
    store = EmbeddingStore(roots)
    assert store.load("good", "clip_l").vectors.shape == (2, 32)
    with pytest.raises(PathNotAllowed):
        store.load("evil", "clip_l")
    assert store.load("nothing-here", "clip_l") is None  # a missing embedding stays a warning
    assert store.find("pickled") is None and store.find("folder") is None


@pytest.mark.parametrize("folder", ["vae", "loras", "embeddings"])
def test_symlink_loops_and_long_names_are_4xx(tree, folder: str) -> None:
    roots, root, outside = tree
    find = EmbeddingStore(roots).find if folder == "embeddings" else (lambda n: roots.resolve(n, [folder]))
    for name in ("loop.safetensors", "loop"):
        with pytest.raises(PathNotAllowed, match="symlink loop") as err:
            find(name)
        _no_host_path(err.value, root, outside)
    for name in (LONG_NAME, f"sub/{LONG_NAME}.safetensors", "a/" * 600):
        with pytest.raises(BadRequest, match="too long") as err:
            find(name)
        assert err.value.status == 400
    if folder != "embeddings":
        with pytest.raises(UnknownModel) as err:
            find("dangling")
        assert "good.safetensors" in err.value.hint  # the hint lists what is there, by relative name
        _no_host_path(err.value, root, outside)


def test_available_lists_only_loadable_files(tree) -> None:
    roots, root, _outside = tree
    assert roots.list(["vae"]) == ["alias.safetensors", "good.safetensors"]  # a link inside the roots
    for folder in FOLDERS:
        for name in roots.list([folder]):
            roots.resolve(f"{folder}/{name}", [folder])  # every listed file resolves
    assert roots.resolve("vae/alias.safetensors", ["vae"]) == root / "checkpoints" / "good.safetensors"


def test_absolute_and_parent_paths_name_no_host_path(tree) -> None:
    roots, root, outside = tree
    for name in (str(outside / "secret.safetensors"), "../outside/secret.safetensors", "../../etc/passwd"):
        with pytest.raises(PathNotAllowed) as err:
            roots.resolve(name, ["vae"])
        assert str(root) not in json.dumps(err.value.to_json())
    assert roots.resolve(str(root / "vae" / "good.safetensors"), ["vae"]) == root / "vae" / "good.safetensors"


@pytest.fixture
def served_root(tmp_path: Path, models_dir: Path) -> tuple[Path, Path]:
    """A models root with the small VAE and CLIP-L, plus the traps of `tree` beside them."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    secret = _tensor_file(outside / "secret.safetensors")
    for name in (VAE, CLIP):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(models_dir / name, root / name)
    vae = root / "vae"
    (vae / "evil.safetensors").symlink_to(secret)
    (vae / "loop.safetensors").symlink_to(vae / "loop.safetensors")
    (vae / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _tensor_file(root / "embeddings" / "style.safetensors")
    (root / "embeddings" / "evil.safetensors").symlink_to(secret)
    (root / "embeddings" / "loop.safetensors").symlink_to(root / "embeddings" / "loop.safetensors")
    return root, outside


async def _ask(session: aiohttp.ClientSession, method: str, url: str, body: object = None) -> tuple[int, str]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, (await resp.read()).decode(errors="replace")


async def test_vae_service_path_attacks_get_4xx_and_no_host_path(served_root, start_service) -> None:
    root, outside = served_root
    svc = start_service(build_vae, make_settings(root))
    base = f"{svc.url}/v1/vae"
    cases = [
        ("vae/loop.safetensors", 403, "symlink loop"),
        ("vae/evil.safetensors", 403, "outside the model roots"),
        (LONG_NAME, 400, "too long"),
        (str(outside / "secret.safetensors"), 403, "outside the model roots"),
        ("../../etc/passwd", 403, "outside the model roots"),
        ("vae/corrupt.safetensors", 422, "not a valid safetensors file"),
        ("vae/missing.safetensors", 404, "not found"),
    ]
    answers = []
    async with aiohttp.ClientSession() as session:
        for name, status, text in cases:
            got, body = await _ask(session, "POST", f"{base}/load", {"model": name})
            assert (got, text in body) == (status, True), (name, got, body)
            answers.append(body)
        status, body = await _ask(session, "GET", f"{base}/models")
        # The link out, the loop: not offered. (Whether a file's bytes parse is for the load to say.)
        assert status == 200 and json.loads(body)["available"] == ["vae/corrupt.safetensors", VAE]
        answers.append(body)
        status, body = await _ask(session, "GET", f"{svc.url}/v1/status")
        answers.append(body)
        status, body = await _ask(session, "POST", f"{base}/load", {"model": VAE})
        assert status == 200  # the service stayed up and loads the real file
    for body in answers:
        assert str(root) not in body and str(outside) not in body and str(root.parent) not in body, body


async def test_clip_service_refuses_embeddings_outside_the_roots(served_root, start_service) -> None:
    root, _outside = served_root
    svc = start_service(build_clip, make_settings(root))
    url = f"{svc.url}/v1/clip/encode"
    async with aiohttp.ClientSession() as session:
        for text, status, message in [
            ("a embedding:evil cat", 403, "outside the model roots"),
            ("a embedding:loop cat", 403, "symlink loop"),
            (f"a embedding:{LONG_NAME} cat", 400, "too long"),
        ]:
            got, body = await _ask(session, "POST", url, {"model": CLIP, "text": text})
            assert (got, message in body) == (status, True), (text, got, body)
            assert str(root.parent) not in body
        got, body = await _ask(session, "POST", url, {"model": CLIP, "text": "a embedding:style cat"})
        assert got == 200, body
