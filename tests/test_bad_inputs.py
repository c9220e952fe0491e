"""The bad-input table: every kind of bad input the CLI, a YAML config or the API can get, in one place.

Each row asserts: exit status 2 (CLI) or a typed OffloadError (API); one line `error: <problem>; <fix>` naming
the problem; no traceback; no weight loaded (build_model is replaced by a tripwire) unless the row needs the
weights to get there; and nothing written in the test's folder. Fault tests for session files and signals follow.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM
from offload.cli.main import main as cli_main
from offload.errors import (CapacityError, ConfigError, ModelLoadError, OffloadError, SessionClosedError,
                            SessionFileError)
from offload.model.loaders import build

# "billion laughs": 9 levels of 9 aliases each under a real option; printing or parsing it expands 9**9 items
ALIAS_BOMB = "ctx: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama").path


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, tiny):
    """Tiny folders whose config.json disagrees with the weights: fewer layers, another vocabulary."""
    out = {}
    for name, change in (("layers", {"num_hidden_layers": 1}), ("vocab", {"vocab_size": 400})):
        folder = tmp_path_factory.mktemp(name)
        cfg = json.loads((tiny / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        (folder / "model.safetensors").symlink_to(tiny / "model.safetensors")
        out[name] = folder
    return out


@pytest.fixture
def no_weights(monkeypatch):
    """A tripwire: the row must be refused before any weight loads."""
    def tripwire(*a, **k):
        raise AssertionError("weights were loaded before the bad input was refused")
    monkeypatch.setattr(build, "build_model", tripwire)


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


@contextlib.contextmanager
def _no_hang(seconds: int = 60):
    """A row that blocks (a FIFO opened for reading) fails instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds}s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# id: (setup(tmp, models) -> argv, words the one line must contain)
CLI_ROWS = {
    "model-fifo": (lambda t, m: ["-m", _fifo(t / "m.gguf"), "-p", "x"], ["FIFO", "m.gguf"]),
    "model-device": (lambda t, m: ["-m", "/dev/zero", "-p", "x"], ["character device"]),
    "model-fewer-layers": (lambda t, m: ["-m", str(m["layers"]), "-p", "x"], ["model.layers.1", "does not use"]),
    "model-other-vocab": (lambda t, m: ["-m", str(m["vocab"]), "-p", "x"], ["embed_tokens", "shape"]),
    "model-no-tokenizer": (lambda t, m: ["-m", str(m["tiny"]), "-p", "x"], ["no tokenizer"]),
    "config-fifo": (lambda t, m: ["--config", _fifo(t / "c.yaml"), "-p", "x"], ["FIFO", "--config"]),
    "config-alias-bomb": (lambda t, m: ["--config", _write(t / "c.yaml", ALIAS_BOMB), "-p", "x"], ["alias", "line 1"]),
    "config-deep": (lambda t, m: ["--config", _write(t / "c.yaml", "a: " + "[" * 20000 + "]" * 20000), "-p", "x"],
                    ["c.yaml"]),
    "config-huge": (lambda t, m: ["--config", _write(t / "c.yaml", "# x\n" * 300000), "-p", "x"], ["bytes"]),
    "config-not-utf8": (lambda t, m: ["--config", _write(t / "c.yaml", b"ctx: 8K\n# \xff\xfe\n"), "-p", "x"],
                        ["UTF-8"]),
    "config-key-type": (lambda t, m: ["--config", _write(t / "c.yaml", "1: 2\n"), "-p", "x"], ["key"]),
    "config-list": (lambda t, m: ["--config", _write(t / "c.yaml", "- ctx\n"), "-p", "x"], ["mapping"]),
    "config-ctx-list": (lambda t, m: ["--config", _write(t / "c.yaml", "ctx: [1, 2]\n"), "-p", "x"], ["--ctx"]),
    "config-temp-list": (lambda t, m: ["--config", _write(t / "c.yaml", "temperature: [0.5]\n"), "-p", "x"],
                         ["--temperature"]),
    "config-tokens-str": (lambda t, m: ["--config", _write(t / "c.yaml", "max-new-tokens: many\n"), "-p", "x"],
                          ["--max-new-tokens"]),
    "config-index-options": (lambda t, m: ["--config", _write(t / "c.yaml", "index_options: 3\n"), "-p", "x"],
                             ["index-options"]),
    "config-streaming-heads": (lambda t, m: ["--config", _write(t / "c.yaml", "streaming_heads: {0: x}\n"), "-p", "x"],
                               ["streaming_heads"]),
    "config-bool-seed": (lambda t, m: ["--config", _write(t / "c.yaml", "seed: yes\n"), "-p", "x"], ["--seed"]),
    "temperature-nan": (lambda t, m: ["--temperature", "nan", "-p", "x"], ["temperature", "finite"]),
    "temperature-inf": (lambda t, m: ["--temperature", "inf", "-p", "x"], ["temperature", "finite"]),
    "top-p-nan": (lambda t, m: ["--top-p", "nan", "-p", "x"], ["top-p"]),
    "seed-too-big": (lambda t, m: ["--seed", str(2**64), "-p", "x"], ["seed", "2**64"]),
    "seed-negative": (lambda t, m: ["--seed", "-1", "-p", "x"], ["seed"]),
    "prompt-not-utf8": (lambda t, m: ["-p", "caf\udce9"], ["--prompt", "UTF-8"]),
    "system-not-utf8": (lambda t, m: ["-s", "\udcff", "-p", "x"], ["--system", "UTF-8"]),
    "file-not-utf8": (lambda t, m: ["-f", _write(t / "d.txt", b"caf\xe9\n"), "-p", "x"], ["d.txt", "UTF-8"]),
    "file-fifo": (lambda t, m: ["-f", _fifo(t / "d.txt"), "-p", "x"], ["FIFO"]),
    "file-folder": (lambda t, m: ["-f", str(t), "-p", "x"], ["directory"]),
    "budget": (lambda t, m: ["--attention", "sparse", "--budget", "lots", "-p", "x"], ["lots"]),
    "index": (lambda t, m: ["--attention", "sparse", "--index", "magic", "-p", "x"], ["magic"]),
    # issue 13: a mass threshold outside (0, 1], a floor above the cap, an index option of the wrong type or range
    "budget-mass-above-1": (lambda t, m: ["--attention", "sparse", "--budget", "p=1.5", "-p", "x"],
                            ["p=1.5", "outside (0, 1]"]),
    "budget-mass-zero": (lambda t, m: ["--attention", "sparse", "--budget", "p=0,cap=2K", "-p", "x"],
                         ["p=0", "outside (0, 1]"]),
    "budget-floor-above-cap": (lambda t, m: ["--attention", "sparse", "--budget", "p=0.9,floor=4K,cap=2K", "-p", "x"],
                               ["floor=4096", "above cap=2048"]),
    "index-option-type": (lambda t, m: ["--config", _write(t / "c.yaml", "index: shadow\nindex_options: {rank: x}\n"),
                                        "-p", "x"], ["rank='x'", "whole number"]),
    "index-option-bool": (lambda t, m: ["--config", _write(t / "c.yaml", "index: ann\nindex_options: {nprobe: true}\n"),
                                        "-p", "x"], ["nprobe=True", "whole number"]),
    "index-option-range": (lambda t, m: ["--config", _write(t / "c.yaml",
                                                            "index: ann\nindex_options: {probe_fraction: 2.0}\n"),
                                         "-p", "x"], ["probe_fraction=2.0", "0 < probe_fraction <= 1"]),
    "index-option-search": (lambda t, m: ["--config", _write(t / "c.yaml", "index: ann\nindex_options: {search: fast}\n"),
                                          "-p", "x"], ["search='fast'", "'host', 'gpu'"]),
    "disk-dir-is-file": (lambda t, m: ["--disk-dir", _write(t / "f", "x") + "/kv", "-p", "x"], ["not a folder"]),
    "document-longer-than-ctx": (lambda t, m: ["--ctx", "64", "-f", _write(t / "d.txt", "word " * 400), "-p", "x"],
                                 ["tokens but ctx is 64", "--ctx"]),
}


@pytest.mark.parametrize("row", list(CLI_ROWS))
def test_cli_bad_input(row, tmp_path, capsys, no_weights, tiny, mismatched, smollm2_gguf, monkeypatch):
    monkeypatch.setenv("OFFLOAD_OFFLINE", "1")
    setup, words = CLI_ROWS[row]
    work = tmp_path / "work"
    work.mkdir()
    argv = setup(work, {**mismatched, "tiny": tiny})
    if "-m" not in argv:
        argv = ["-m", str(smollm2_gguf), *argv]
    before = _listing(work)
    with pytest.raises(SystemExit) as exit_, _no_hang():
        cli_main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert "Traceback" not in err and out == ""
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert _listing(work) == before      # nothing written or removed


def test_cli_stdin_that_is_not_utf8(smollm2_gguf, monkeypatch, capsys):
    """Interactive input is read after the weights load: the bad line still gets the one-line error."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
    with pytest.raises(SystemExit) as exit_, _no_hang():
        cli_main(["-m", str(smollm2_gguf), "--device", "cpu", "--ctx", "512", "-n", "2"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "UTF-8" in errors[0] and "; " in errors[0] and "Traceback" not in err and out == ""


# id: (setup(tmp, models) -> LLM kwargs, error type, words)
API_ROWS = {
    "ctx-list": (lambda t, m: dict(ctx=[1]), ConfigError, ["--ctx"]),
    "temperature-inf": (lambda t, m: dict(temperature=math.inf), ConfigError, ["finite"]),
    "seed-too-big": (lambda t, m: dict(seed=2**64), ConfigError, ["seed"]),
    "chunk-tokens-str": (lambda t, m: dict(chunk_tokens="32"), ConfigError, ["chunk-tokens"]),
    "model-fifo": (lambda t, m: dict(model=_fifo(t / "m")), ModelLoadError, ["FIFO"]),
    "model-fewer-layers": (lambda t, m: dict(model=m["layers"]), ModelLoadError, ["model.layers.1"]),
    "index-option": (lambda t, m: dict(model=m["tiny"], attention="sparse", index_options={"bogus": 1}),
                     ConfigError, ["bogus"]),
    "budget-per-layer": (lambda t, m: dict(model=m["tiny"], attention="sparse", budget=["5%"] * 5),
                         ConfigError, ["budget"]),
    "disk-mem-without-dir": (lambda t, m: dict(model=m["tiny"], disk_mem="1GiB"), CapacityError, ["--disk-dir"]),
}


@pytest.mark.parametrize("row", list(API_ROWS))
def test_api_bad_input(row, tmp_path, no_weights, tiny, mismatched):
    setup, error, words = API_ROWS[row]
    kwargs = {"model": str(tiny), "device": "cpu", **setup(tmp_path, {**mismatched, "tiny": tiny})}
    before = _listing(tmp_path)
    with pytest.raises(error) as e, _no_hang():
        LLM(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "; " in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert _listing(tmp_path) == before


# ---- sessions: closed, several at once, files ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tiny):
    llm = LLM(str(tiny), device="cpu", ctx=256)
    yield llm
    llm.close()


def test_sessions_coexist_and_closed_ones_say_so(tiny_llm):
    a, b = tiny_llm.session(), tiny_llm.session()
    la = a.prefill([5, 6, 7])
    b.prefill([9, 9])
    c = tiny_llm.session()
    torch.testing.assert_close(c.prefill([5, 6, 7]), la)    # each session owns its KV: b did not disturb a
    torch.testing.assert_close(a.step(8), c.step(8))
    b.close()
    for use in (lambda: b.step(1), lambda: b.prefill([1]), lambda: b.fork(), lambda: b.save("never.offload")):
        with pytest.raises(SessionClosedError, match="closed .*; start a new one"):
            use()
    a.step(3)                                                # the others go on
    a.close(), c.close()


def test_a_session_that_cannot_fit_beside_others_is_refused(tiny_llm, monkeypatch):
    from offload import backends
    kept = tiny_llm.session()
    kept.prefill([1, 2])

    def no_room(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    monkeypatch.setattr(backends, "make", no_room)
    with pytest.raises(CapacityError, match=r"beside the \d+ open session.*; close one") as e:
        tiny_llm.session()
    assert "\n" not in str(e.value)
    kept.step(3)                              # the open session is untouched
    kept.close()


def _saved(llm, folder: Path) -> Path:
    sess = llm.session()
    sess.prefill([3, 4, 5, 6])
    path = folder / "s.offload"
    sess.save(path)
    sess.close()
    return path


def _with_header(path: Path, edit) -> None:
    """Rewrite the header through `edit(dict) -> object` and give it a valid checksum."""
    data = path.read_bytes()
    n = 9
    hlen = struct.unpack("<Q", data[n + 4:n + 12])[0]
    header = json.loads(data[n + 12:n + 12 + hlen])
    hb = edit(header)
    hb = hb if isinstance(hb, bytes) else json.dumps(hb).encode()
    body = data[n + 12 + hlen + 4:]
    path.write_bytes(data[:n + 4] + struct.pack("<Q", len(hb)) + hb + struct.pack("<I", zlib.crc32(hb)) + body)


HEADER_ROWS = {
    "not-an-object": lambda h: [h],
    "not-utf8": lambda h: b'{"tokens": "\xff"}',
    "no-tokens": lambda h: {k: v for k, v in h.items() if k != "tokens"},
    "length-is-str": lambda h: {**h, "length": "4"},
    "count-not-length": lambda h: {**h, "tokens": h["tokens"][:-1]},
    "token-outside-vocab": lambda h: {**h, "tokens": h["tokens"][:-1] + [10**6]},
    "negative-token": lambda h: {**h, "tokens": h["tokens"][:-1] + [-1]},
    "layout-not-a-dict": lambda h: {**h, "layout": 3},
    "bad-dtype": lambda h: {**h, "layout": {**h["layout"], "dtype": "int8"}},
    "other-head-count": lambda h: {**h, "layout": {**h["layout"], "num_kv_heads": 99}},
}


@pytest.mark.parametrize("row", list(HEADER_ROWS))
def test_session_header_checksum_ok_content_bad(row, tiny_llm, tmp_path):
    path = _saved(tiny_llm, tmp_path)
    _with_header(path, HEADER_ROWS[row])
    with pytest.raises(SessionFileError) as e:
        tiny_llm.load_session(path)
    assert "\n" not in str(e.value) and "; " in str(e.value)


def test_session_files_are_private_and_saves_fail_typed(tiny_llm, tmp_path):
    path = _saved(tiny_llm, tmp_path)
    assert (path.stat().st_mode & 0o777) == 0o600
    sess = tiny_llm.load_session(path)
    for target in (tmp_path / "gone" / "s.offload", path / "under-a-file.offload", Path("/proc/nope.offload")):
        with pytest.raises(SessionFileError, match="cannot write session"):
            sess.save(target)
    with pytest.raises(SessionFileError, match="FIFO"):
        sess.save(_fifo(tmp_path / "pipe"))
    with pytest.raises(SessionFileError, match="FIFO"):
        tiny_llm.load_session(tmp_path / "pipe")
    sess.close()


def test_killed_save_leaves_no_temp_after_next_save(tiny_llm, tiny, tmp_path):
    script = (f"import os, offload.persist as p; from offload import LLM\n"
              f"llm = LLM({str(tiny)!r}, device='cpu', ctx=256); s = llm.session(); s.prefill([1, 2, 3])\n"
              "os.fsync = lambda fd: os._exit(9)   # die half-way, after the temp file is written\n"
              f"s.save({str(tmp_path / 'k.offload')!r})\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert [p.name for p in tmp_path.iterdir() if "offload-tmp" in p.name]   # the kill left one
    keep = tmp_path / ".notes.offload-tmp-backup"                           # not our pattern: kept
    keep.write_text("mine")
    _saved(tiny_llm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keep.name, "s.offload"])


# ---- signals and spill folders ----------------------------------------------------------------------------
def test_sigterm_removes_spilled_kv(smollm2_gguf, tmp_path):
    kv = tmp_path / "kv"
    kv.mkdir()
    args = ["-m", str(smollm2_gguf), "--device", "cpu", "--ctx", "2048", "--gpu-mem", "32MiB", "--host-mem", "16MiB",
            "--disk-dir", str(kv), "-n", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "offload.cli.main", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OFFLOAD_NO_PROGRESS": "1"})
    try:
        deadline = time.time() + 120
        while not any(kv.iterdir()) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert any(kv.iterdir()), proc.stderr.read().decode() if proc.poll() is not None else "no spill dir"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert list(kv.iterdir()) == []


def test_every_start_naming_disk_dir_sweeps(tiny, tmp_path):
    kv = tmp_path / "kv"
    kv.mkdir()
    script = ("import os; from offload.tiers.diskdir import make_private_dir\n"
              f"make_private_dir({str(kv)!r}); os._exit(0)   # a crash: no cleanup\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    (kv / "offload-1-mine").mkdir()                   # a user's look-alike folder stays
    assert len(list(kv.iterdir())) == 2
    LLM(str(tiny), device="cpu", ctx=256, disk_dir=str(kv)).close()   # this run never spills
    assert [p.name for p in kv.iterdir()] == ["offload-1-mine"]


def test_every_error_is_an_offload_error():
    for cls in (ConfigError, ModelLoadError, CapacityError, SessionFileError, SessionClosedError):
        assert issubclass(cls, OffloadError)


def test_capacity_messages_name_the_real_cause(monkeypatch, tmp_path):
    from offload import planner
    gib = 1 << 30
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 12 * gib)
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 12 * gib)
    with pytest.raises(CapacityError, match=r"weights do not fit on the GPU: 16 GiB of weights"):
        planner.plan_budget(32, 8, 128, 2, 8192, 16 * gib, torch.device("cuda"))     # not "the GPU tier needs ..."
    with pytest.raises(CapacityError, match="less a reserve of max"):
        planner.plan_budget(2, 2, 16, 4, 512, 1, "cpu", disk_mem=1 << 60, disk_dir=str(tmp_path))
