"""Prompt cache of a compressed (int8 / int4) tiered session (issue 11 + 12): packed chunks are saved as the host
tier holds them (not as 4x larger bf16), with the sparse index's rows, and resumed byte for byte."""
import os

import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM
from offload.kvfile import KVFileReader
from offload.prompt_cache import prefill_cached

N = 300
OPTS = dict(device="cpu", ctx=512, chunk_tokens=8, sink_tokens=16, window_tokens=32, gpu_mem="40KiB",
            prefill_chunk=32)
MODES = {"full": dict(attention="full"), "sparse": dict(attention="sparse", budget="64")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pcq"), "llama", num_key_value_heads=2)


@pytest.fixture
def ids():
    return torch.randint(3, 320, (N,), generator=torch.Generator().manual_seed(5)).tolist()


def _kv(sess):
    return [tuple(t.clone() for t in sess.attn.read_kv(layer)) for layer in range(sess.llm.model_config.num_layers)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_resume_is_the_saved_session(ckpt, ids, tmp_path, capsys, mode, kv_dtype, device):
    llm = LLM(str(ckpt.path), kv_dtype=kv_dtype, **{**OPTS, "device": device}, **MODES[mode])
    path = tmp_path / "doc.kvc"
    first = llm.session()
    logits = prefill_cached(first, ids, path)
    want_kv = _kv(first)
    rows = ([first.attn.selector.export_rows(layer, 0, first.attn.n_chunks) for layer in range(first.attn.L)]
            if mode == "sparse" else None)
    want_steps = [first.step(t) for t in (11, 12, 13)]
    st = first.attn.store.read_stored(0, range(first.attn.n_chunks))
    first.close()
    r = KVFileReader(path)
    assert r.layout.kv_dtype == kv_dtype and r.layout.packed_bytes == llm_cold_bytes(llm, first)
    assert int(r.fmt[0, :len(st.packed)].sum()) == int(st.packed.sum()) > 0     # packed blocks saved packed
    assert (r.layout.row_bytes > 0) == (mode == "sparse")
    r.close()
    capsys.readouterr()
    again = llm.session()
    got = prefill_cached(again, ids, path)
    assert "resumed 300 of 300" in capsys.readouterr().err
    assert torch.equal(got, logits)
    for a, b in zip(_kv(again), want_kv):       # every value the saved session held, bit for bit
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if rows is not None:                        # the index the saved session built from unquantized keys
        for layer in range(again.attn.L):
            assert torch.equal(again.attn.selector.export_rows(layer, 0, again.attn.n_chunks), rows[layer])
    # decode merges tier parts in placement order, which the resumed session lays out differently
    for a, b in zip([again.step(t) for t in (11, 12, 13)], want_steps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    again.close()


def test_an_int8_cache_of_an_older_packed_layout_prefills_afresh(ckpt, ids, tmp_path, capsys, monkeypatch):
    """int8 blocks of layout 1 (fp16 pairs, 0.5625x) are not layout 2's: a cache whose key records no layout (a
    writer before layout 2) or another one is prefilled afresh with one line, never read as this layout."""
    from offload.kernels import quant
    llm = LLM(str(ckpt.path), kv_dtype="int8", **OPTS, **MODES["sparse"])
    path = tmp_path / "doc.kvc"
    monkeypatch.setitem(quant.LAYOUTS, "int8", 1)             # what a writer of layout 1 recorded
    s = llm.session()
    want = prefill_cached(s, ids, path)
    s.close()
    r = KVFileReader(path)
    assert "kv layout" not in r.key and r.layout.kv_dtype == "int8"
    r.close()
    monkeypatch.setitem(quant.LAYOUTS, "int8", 2)
    capsys.readouterr()
    s = llm.session()
    assert torch.equal(prefill_cached(s, ids, path), want)
    s.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kv layout differs (cached -, now int8.v2)" in err[0] and "afresh" in err[0], err
    r = KVFileReader(path)
    assert r.key["kv layout"] == "int8.v2"                    # replaced: the next run resumes it
    r.close()
    s = llm.session()
    prefill_cached(s, ids, path)
    s.close()
    assert "resumed 300 of 300" in capsys.readouterr().err


@pytest.mark.parametrize("opts", [dict(), dict(kv_dtype="int4", **OPTS, **MODES["sparse"])], ids=["dense", "int4"])
def test_a_commit_in_many_groups_writes_the_same_cache(ckpt, ids, tmp_path, monkeypatch, opts):
    """A long commit reads and writes a layer's blocks a group at a time (bounded memory at 1M tokens)."""
    from offload.kvfile import writer as kvfile
    llm = LLM(str(ckpt.path), **(opts or dict(device="cpu", ctx=512, chunk_tokens=32, prefill_chunk=16)))
    files = []
    for group, name in ((1 << 30, "one.kvc"), (1, "many.kvc")):     # one group per layer, one block per group
        monkeypatch.setattr(kvfile, "_GROUP_BYTES", group)
        s = llm.session()
        prefill_cached(s, ids, tmp_path / name)
        s.close()
        files.append((tmp_path / name).read_bytes())
    assert files[0] == files[1]


def llm_cold_bytes(llm, sess):
    return sess.attn.store.cold_shape.nbytes


def test_packed_cache_checkpoints_and_resumes_an_interrupted_prefill(ckpt, ids, tmp_path):
    llm = LLM(str(ckpt.path), kv_dtype="int4", **OPTS, **MODES["sparse"])
    ref = llm.session()
    # the same 64-token segments without a cache: a later segment reads the earlier ones' host chunks as int4
    # (within one prefill call they are still bf16), so segmenting itself moves the logits; the cache must not
    want = [ref.prefill(ids[i:i + 64]) for i in range(0, N, 64)][-1]
    ref.close()
    path = tmp_path / "doc.kvc"

    def stop(done):
        if done == 128:
            raise KeyboardInterrupt

    s = llm.session()
    with pytest.raises(KeyboardInterrupt):
        prefill_cached(s, ids, path, every=64, on_segment=stop)
    s.close()
    assert KVFileReader(path).n == 128
    s = llm.session()
    got = prefill_cached(s, ids, path, every=64)          # resumes at 128, prefills and appends the rest
    # which GPU chunks the policy demotes (and so quantizes) later follows its recency state, which starts
    # afresh in a resumed session: int4 noise on a few chunks, never a different answer
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    assert torch.equal(got.argmax(), want.argmax())
    s.close()
    s = llm.session()
    assert torch.equal(prefill_cached(s, ids, path), got)
    s.close()


def test_damaged_packed_block_or_other_kv_dtype_prefills_afresh(ckpt, ids, tmp_path, capsys):
    llm = LLM(str(ckpt.path), kv_dtype="int4", **OPTS, **MODES["sparse"])
    path = tmp_path / "doc.kvc"
    s = llm.session()
    want = prefill_cached(s, ids, path)
    s.close()
    r = KVFileReader(path)
    layer, b = r.layout.layers - 1, int(r.fmt[r.layout.layers - 1].nonzero()[0][-1])   # the last packed block
    off = r.layout.packed_offset(layer, b) + 5
    r.close()
    with open(path, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0x20]))
    capsys.readouterr()
    s = llm.session()
    assert torch.equal(prefill_cached(s, ids, path), want)
    s.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "prefilling afresh" in err[0], err
    other = LLM(str(ckpt.path), kv_dtype="int8", **OPTS, **MODES["sparse"]).session()
    prefill_cached(other, ids, path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kv_dtype differs" in err[0] and "prefilling afresh" in err[0], err
    other.close()
    assert KVFileReader(path).layout.kv_dtype == "int8" and os.path.getsize(path) > 0


def test_disk_full_while_saving_packed_blocks_keeps_the_older_cache(ckpt, ids, tmp_path, capsys, monkeypatch):
    """The packed grid is written on several threads: a drive that fills part way through still costs nothing
    but the new file (the answer goes on, the older cache stays byte for byte, no temp file is left)."""
    import errno
    llm = LLM(str(ckpt.path), kv_dtype="int4", **OPTS, **MODES["sparse"])
    path = tmp_path / "doc.kvc"
    s = llm.session()
    prefill_cached(s, ids[:200], path)
    s.close()
    old = path.read_bytes()
    other = ids[:50] + [5] * 250
    s = llm.session()
    want = s.prefill(other)
    s.close()
    real, left = os.pwrite, [60_000]

    def full(fd, b, off):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, b[:left[0]], off)
        left[0] -= n
        return n

    monkeypatch.setattr(os, "pwrite", full)
    capsys.readouterr()
    s = llm.session()
    assert torch.equal(prefill_cached(s, other, path), want)
    s.close()
    err = capsys.readouterr().err
    assert "cannot save" in err and "No space left" in err
    assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["doc.kvc"]


def test_long_saves_and_resumes_report_progress_on_stderr(ckpt, ids, tmp_path, capsys, monkeypatch):
    """A 1M-token cache takes a minute or more to save or resume: both print progress lines (here forced by
    lowering the size threshold and the line interval) when stderr is not a terminal."""
    from offload import cache_blocks, progress
    monkeypatch.delenv("OFFLOAD_NO_PROGRESS", raising=False)
    monkeypatch.setattr(cache_blocks, "PROGRESS_BYTES", 0)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.001)
    llm = LLM(str(ckpt.path), kv_dtype="int4", **OPTS, **MODES["sparse"])
    path = tmp_path / "doc.kvc"
    for _ in range(2):
        s = llm.session()
        prefill_cached(s, ids, path)
        s.close()
    err = capsys.readouterr().err
    assert "saving doc.kvc (300 tokens, layers): 2/2" in err and "resuming doc.kvc (layers): 2/2" in err, err


@pytest.fixture
def background_on_cpu(monkeypatch):
    """Checkpoints written on a thread while the prefill goes on (CUDA sessions do it; here forced on the CPU).
    Returns the background flag of every commit."""
    from offload import cache_blocks
    from offload.kvfile import KVFileWriter
    monkeypatch.setattr(cache_blocks, "BACKGROUND_DEVICES", ("cpu", "cuda"))
    flags, real = [], KVFileWriter.commit

    def commit(self, *a, background=False, **kw):
        flags.append(background)
        return real(self, *a, background=background, **kw)

    monkeypatch.setattr(KVFileWriter, "commit", commit)
    return flags


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_background_checkpoints_write_the_file_synchronous_ones_write(ckpt, ids, tmp_path, monkeypatch,
                                                                      background_on_cpu, device):
    """Checkpoints at 64 and 128 go behind the prefill, the one at the interrupt (192) is synchronous; the file is
    byte for byte the one synchronous checkpoints write (each holds the blocks as they were at its commit)."""
    from offload import cache_blocks
    llm = LLM(str(ckpt.path), kv_dtype="int4", **{**OPTS, "device": device}, **MODES["sparse"])

    def stop(done):
        if done == 192:
            raise KeyboardInterrupt

    files = []
    for devices in (("cpu", "cuda"), ()):
        monkeypatch.setattr(cache_blocks, "BACKGROUND_DEVICES", devices)
        path = tmp_path / f"doc-{len(devices)}.kvc"
        s = llm.session()
        with pytest.raises(KeyboardInterrupt):
            prefill_cached(s, ids, path, every=64, on_segment=stop)
        s.close()
        files.append(path.read_bytes())
    assert background_on_cpu == [True, True, False] + [False] * 3 and KVFileReader(tmp_path / "doc-0.kvc").n == 192
    assert files[0] == files[1]


@pytest.mark.parametrize("error", ["ENOSPC", "RuntimeError"])
def test_a_failed_background_checkpoint_is_reported_once_and_the_answer_goes_on(ckpt, ids, tmp_path, capsys,
                                                                                  monkeypatch, background_on_cpu,
                                                                                  error):
    import errno
    llm = LLM(str(ckpt.path), kv_dtype="int4", **OPTS, **MODES["sparse"])
    ref = llm.session()
    want = [ref.prefill(ids[i:i + 64]) for i in range(0, N, 64)][-1]
    ref.close()
    real, calls = os.pwrite, []

    def fail_in_thread(fd, b, off):       # the first background commit's writes fail: the drive is full
        import threading
        if threading.current_thread().name.startswith("offload-cache"):
            calls.append(1)
            if error == "RuntimeError":       # any failure of the thread, not only I/O errors
                raise RuntimeError("injected")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, b, off)

    monkeypatch.setattr(os, "pwrite", fail_in_thread)
    capsys.readouterr()
    s = llm.session()
    got = prefill_cached(s, ids, tmp_path / "doc.kvc", every=64)
    s.close()
    assert torch.equal(got, want) and calls
    err = capsys.readouterr().err
    assert err.count("cannot save") == 1 and ("No space left" if error == "ENOSPC" else "injected") in err
    assert not os.listdir(tmp_path)                       # the never-committed new file is gone, no temp left


def test_a_drive_that_accepts_no_bytes_is_reported_as_full(ckpt, ids, tmp_path, capsys, monkeypatch):
    """pwrite returning 0 (nothing written, no error): the cache is not saved (one line), the answer stands."""
    llm = LLM(str(ckpt.path), kv_dtype="int4", **OPTS, **MODES["sparse"])
    s = llm.session()
    want = s.prefill(ids)
    s.close()
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: 0)
    capsys.readouterr()
    s = llm.session()
    assert torch.equal(prefill_cached(s, ids, tmp_path / "doc.kvc"), want)
    s.close()
    err = capsys.readouterr().err
    assert "cannot save" in err and "No space left" in err and not os.listdir(tmp_path)


def test_a_session_that_cannot_add_index_rows_writes_a_new_file(ckpt, ids, tmp_path):
    """A sparse cache made with 8-token chunks carries index rows; a session of 16-token chunks resumes it by
    copying (its chunks differ) and cannot produce 8-token rows for the rest: it writes a new file instead of
    extending this one with blank rows, so the next 8-token resume builds a true index."""
    base = dict(device="cpu", ctx=512, sink_tokens=16, window_tokens=32, gpu_mem="40KiB", prefill_chunk=32,
                attention="sparse", budget="64", disk_dir=str(tmp_path / "kv"), disk_mem="4MiB", host_mem="30KiB")
    c8 = LLM(str(ckpt.path), chunk_tokens=8, **base)
    path = tmp_path / "doc.kvc"
    def stop(done):
        if done == 160:
            raise KeyboardInterrupt

    s = c8.session()
    with pytest.raises(KeyboardInterrupt):          # a file with room for all 300 tokens, 160 committed
        prefill_cached(s, ids, path, every=32, on_segment=stop)
    s.close()
    r = KVFileReader(path)
    assert r.layout.row_bytes > 0 and r.n == 160 and r.layout.capacity == N
    r.close()
    s = LLM(str(ckpt.path), chunk_tokens=16, **base).session()
    prefill_cached(s, ids, path)
    s.close()
    s = c8.session()
    prefill_cached(s, ids, path)
    for layer in range(s.attn.L):    # every chunk's index row holds the min / max of the keys it now holds
        k = s.attn.read_kv(layer)[0][:, :N // 8 * 8]                            # k: [Hkv, n*8, D]
        chunks = k.unflatten(1, (-1, 8))                                         # chunks: [Hkv, n, 8, D]
        want = torch.stack([chunks.amin(2), chunks.amax(2)])                     # want: [2, Hkv, n, D]
        rows = s.attn.selector.export_rows(layer, 0, N // 8)                     # rows: [n, R] u8
        got = rows.view(k.dtype).view(N // 8, 2, k.shape[0], -1).permute(1, 2, 0, 3)   # got: [2, Hkv, n, D]
        assert torch.equal(got, want), layer
    s.close()


def test_cli_int4_prompt_cache_answers_the_same_after_a_resume(smollm2_gguf, tmp_path):
    """The user's flow with compressed KV: offload-chat -f doc --kv-dtype int4 --prompt-cache FILE, twice; the
    second run resumes the packed cache and prints the same answer as the first."""
    from test_cli import run_cli
    doc, cache = tmp_path / "doc.txt", tmp_path / "doc.kvc"
    doc.write_text("Harbour log.\n" + "".join(f"Pier {i} moored {i % 5 + 1} boats at dawn.\n" for i in range(60))
                   + "The red ferry carried exactly 9 bicycles.\n")
    q = ["-m", str(smollm2_gguf), "-f", str(doc), "-n", "10", "-p", "How many bicycles did the red ferry carry?",
         "--kv-dtype", "int4", "--attention", "sparse", "--gpu-mem", "16MiB", "--prompt-cache", str(cache)]
    first, again = run_cli(*q), run_cli(*q)
    for r in (first, again):
        assert r.returncode == 0, r.stderr
    assert "none yet" in first.stderr and "packed int4 blocks kept as they are" in again.stderr, again.stderr
    r = KVFileReader(cache)
    assert again.stdout == first.stdout and r.layout.kv_dtype == "int4" and r.fmt.any()   # packed blocks in it


def test_an_interrupt_while_waiting_for_a_background_commit_never_lets_two_commits_write(tmp_path):
    """Ctrl-C during wait() (the main thread joins a background checkpoint) must leave it joinable: the commit
    that follows waits for it, so the file ends at the later commit, readable (found in review)."""
    import signal
    import threading

    from offload.kvfile import KVFileWriter, Layout
    from offload.tiers.cold import StoredChunks
    lay = Layout(layers=2, kv_heads=1, head_dim=8, dtype="bfloat16", block_tokens=4, capacity=64, vocab=16)
    path = tmp_path / "c.kvc"
    w = KVFileWriter.create(path, lay, {"k": 1})
    gate, real = threading.Event(), os.pwrite

    def held_back(fd, b, off):                 # the background commit's writes wait for the gate
        if threading.current_thread().name.startswith("offload-cache-write") and not gate.is_set():
            gate.wait(10)
        return real(fd, b, off)

    w._pwrite = held_back
    gen = torch.Generator().manual_seed(0)

    def blocks(layer, b0, b1):
        kv = torch.randn(b1 - b0, 2, 1, 4, 8, generator=gen).bfloat16()          # kv: [m, 2, Hkv, C, D]
        return StoredChunks(torch.zeros(b1 - b0, dtype=torch.bool), kv, None), None

    ids = list(range(64))
    w.commit(8, ids, torch.zeros(16), blocks, background=True)
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        w.wait()
    threading.Timer(0.3, gate.set).start()
    w.commit(16, ids, torch.ones(16), blocks)  # waits for the background commit first
    w.close()
    r = KVFileReader(path)
    assert r.n == 16 and r.seq == 2
    for layer in range(2):
        r.read_stored(layer, 0, r.committed_blocks)                              # every block CRC-checks


def test_a_background_commit_too_big_to_hold_is_written_at_once(tmp_path):
    from offload.kvfile import KVFileWriter, Layout
    from offload.tiers.cold import StoredChunks
    lay = Layout(layers=2, kv_heads=1, head_dim=8, dtype="bfloat16", block_tokens=4, capacity=64, vocab=16)
    w = KVFileWriter.create(tmp_path / "c.kvc", lay, {"k": 1})

    def blocks(layer, b0, b1):
        return StoredChunks(torch.zeros(b1 - b0, dtype=torch.bool), torch.ones(b1 - b0, 2, 1, 4, 8).bfloat16(), None), None

    w.commit(16, list(range(64)), torch.zeros(16), blocks, background=True, max_held=100)
    assert w._bg is None and w.n == 16              # no thread: more than 100 bytes were read
    w.close()
    assert KVFileReader(tmp_path / "c.kvc").n == 16
