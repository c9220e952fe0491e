"""Time to first token with and without the prompt cache (issue 11), and what resuming reads.

    python bench/prompt_cache.py --doc-tokens 4096 --out bench/results/prompt_cache_cpu.json

For one document of --doc-tokens tokens and a short question, in one process on the same model:
  no cache   prefill document + question, then the first token
  first run  prefill the document through the cache (writes it), the question, the first token
  resumed    read the document's KV from the cache (no prefill), prefill the question, the first token
Timings start after the model is loaded; they are medians of --reps runs (the first run once per rep, into a
fresh file). The page cache is warm for "resumed" (the file was just written), as in a rerun of a session.

    python bench/prompt_cache.py --synthetic 1M --model llama3-8b --device cuda --kv-dtype int4 --attention sparse \
        --host-mem 48GiB --gpu-cap 24 --dir /tmp/pc --out $OUT/prompt_cache_1m.json
A session filled to N tokens of synthetic KV (bench/synthetic_fill.py) is saved as a prompt cache (packed blocks
and index rows for int8 / int4), dropped from the page cache, and resumed in a fresh session; then a question and
its first token. "first_token_after_start_s" = model load + resume + question. Decode is timed before and after.

    python bench/prompt_cache.py --resume-sizes 16K,64K --out bench/results/prompt_cache_resume_cpu.json
    python bench/prompt_cache.py --resume-sizes 256K --model llama3-8b --load-format dummy --device cuda \
        --gpu-mem 2GiB --host-mem 4GiB --dir /tmp/pc --gpu-cap 24 --out $OUT/prompt_cache_resume_h200.json

Resume of a tiered session (KV spread over GPU, host and a disk tier) from a cache of N tokens, per size:
  in place   the disk tier adopts the file's cold blocks (offload/cache_attach.py); what is read eagerly
  copy-in    every block read and put into the store, which writes what GPU + host cannot hold to its spill file
and for each, the time to resume, then to prefill a --question-token question and take its first token (exact
attention reads every chunk once for it). The cache file is written straight from random KV of the model's
shape (no prefill: resuming costs bytes, not values) and dropped from the page cache (posix_fadvise DONTNEED)
before each resume, so reads come from the drive, as after a restart.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cap_gpu, median, sync, write_results  # noqa: E402

import torch  # noqa: E402

from offload import LLM  # noqa: E402


def document_ids(llm, n: int) -> list[int]:
    lines, i = [], 0
    text = ""
    while True:
        lines.append(f"Record {i}: the crate on shelf {i % 97} holds {(i * 7919) % 1000} bolts and {i % 13} lamps.")
        i += 1
        if i % 64 == 0:
            text = "\n".join(lines)
            ids = llm.tokenizer.encode(text, add_special_tokens=True)
            if len(ids) >= n:
                return ids[:n]


def first_token(sess, doc, question, cache=None) -> tuple[float, int]:
    t0 = time.perf_counter()
    if cache is None:
        logits = sess.prefill(doc + question)
    else:
        sess.prefill(doc, prompt_cache=cache)
        logits = sess.prefill(question)
    tok = int(logits.argmax())
    return time.perf_counter() - t0, tok


def _parse_tokens(text: str) -> list[int]:
    from offload.config import parse_tokens
    return [parse_tokens(x) for x in text.split(",")]


def _drop_cached(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_cache(sess, path: Path, n: int, seed: int = 0) -> list[int]:
    """A valid cache file of n tokens of random KV for this session's model and options; returns its ids."""
    from offload.kvfile import KVFileWriter, Layout
    from offload.prompt_cache import cache_key
    mc, C = sess.llm.model_config, sess.config.chunk_tokens
    dtype = sess.llm.model.dtype
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, mc.vocab_size, (n,), generator=g).tolist()
    w = KVFileWriter.create(path, Layout(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                         str(dtype).replace("torch.", ""), C, n, mc.vocab_size), cache_key(sess))

    base = torch.randn(2, mc.num_kv_heads, 4096, mc.head_dim, generator=g).to(dtype)  # base: [2, Hkv, 4096, D]

    def blocks(layer, b0, b1):   # the base rolled per layer and tiled (values do not matter), in C-token blocks
        from offload.tiers.base import to_chunks
        from offload.tiers.cold import StoredChunks
        t = base.roll(layer * 97, 2).repeat(1, 1, -(-(b1 - b0) * C // 4096), 1)[:, :, :(b1 - b0) * C]
        t[:, :, max(0, n - b0 * C):] = 0                                  # past the prompt's end: zero padding
        return StoredChunks(torch.zeros(b1 - b0, dtype=torch.bool), to_chunks(t[0], t[1], C), None), None

    w.commit(n, ids, torch.randn(mc.vocab_size, generator=g), blocks)
    w.close()
    return ids


def save_session(sess, path: Path) -> None:
    """Write the session's whole KV (however it was filled) as a prompt cache of sess.tokens."""
    from offload.kvfile import KVFileWriter
    from offload.cache_blocks import read_session_blocks, session_layout
    from offload.prompt_cache import cache_key
    ids, C = list(sess.tokens), sess.attn.C
    w = KVFileWriter.create(path, session_layout(sess, C, len(ids)), cache_key(sess))
    try:
        w.commit(len(ids), ids, torch.zeros(sess.llm.model_config.vocab_size),
                 lambda layer, b0, b1: read_session_blocks(sess.attn, layer, b0, b1, len(ids), C))
    finally:
        w.close()


def _steps(sess, n: int) -> dict:
    """n greedy decode steps: median / mean / p99 / max ms."""
    tok, ms = 0, []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        tok = int(sess.step(tok).argmax())
        sync()
        ms.append(1000 * (time.perf_counter() - t0))
    ms = sorted(ms[2:])                      # two warm-up steps (graph capture)
    return {"median": round(ms[len(ms) // 2], 2), "mean": round(sum(ms) / len(ms), 2),
            "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2), "max": round(ms[-1], 2)}


def disk_ceiling(folder: Path, gib: int = 4, threads: int = 8) -> dict:
    """The drive's own speed in the same run: write `gib` GiB in 64 MiB pieces (fsync), drop it from the page
    cache, read it back on `threads` threads. The reference a resume's read rate is measured against."""
    from concurrent.futures import ThreadPoolExecutor
    path, piece = folder / "ceiling.bin", 64 << 20
    buf = os.urandom(piece)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for i in range(gib * 16):
            os.pwrite(fd, buf, i * piece)
        os.fsync(fd)
        w = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: os.pread(fd, piece, i * piece), range(gib * 16)))
        r = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return {"disk_write_GBps": round(gib * 2**30 / w / 1e9, 2), "disk_read_GBps": round(gib * 2**30 / r / 1e9, 2)}


def synthetic_rows(a) -> list[dict]:
    """A session filled to N tokens of synthetic KV (bench/synthetic_fill.py), saved as a prompt cache, dropped
    from the page cache, resumed in a fresh session, then a question and its first token; decode before/after."""
    import gc

    from synthetic_fill import fill
    rows = []
    work = Path(a.dir or tempfile.mkdtemp(prefix="pcbench-"))
    ceiling = disk_ceiling(work)
    print(ceiling, file=sys.stderr, flush=True)
    for n in _parse_tokens(a.synthetic):
        t0 = time.perf_counter()
        opts = dict(model=a.model, load_format=a.load_format or "dummy", ctx=n + a.question + 2 * a.steps + 64,
                    attention=a.attention, budget=a.budget, host_mem=a.host_mem, kv_dtype=a.kv_dtype,
                    device=a.device, show_progress=False)
        if a.synthetic_gpu_mem:
            opts["gpu_mem"] = a.synthetic_gpu_mem
        if a.disk_dir:
            opts["disk_dir"] = a.disk_dir
        if a.no_rows:       # the file without index rows: a sparse resume rebuilds the index from the keys
            import offload.cache_blocks as cb
            real_layout = cb.session_layout
            cb.session_layout = lambda *x, **k: dataclasses.replace(real_layout(*x, **k), row_bytes=0)
        llm = LLM(**opts)
        load_s = time.perf_counter() - t0
        s = llm.session()
        filled = fill(s, n)
        ids, path = list(s.tokens), work / f"synthetic-{n}.kvc"
        t1 = time.perf_counter()
        save_session(s, path)
        save_s = time.perf_counter() - t1
        st = os.stat(path)
        before = _steps(s, a.steps)
        s.close()
        del s
        gc.collect()
        _drop_cached(path)
        question = torch.randint(3, llm.model_config.vocab_size, (a.question,),
                                 generator=torch.Generator().manual_seed(1)).tolist()
        s = llm.session()
        t2 = time.perf_counter()
        s.prefill(ids, prompt_cache=path)
        sync()
        t3 = time.perf_counter()
        int(s.prefill(question).argmax())
        sync()
        t4 = time.perf_counter()
        after = _steps(s, a.steps)
        rows.append({"fill": "synthetic", "tokens": n, "kv_dtype": a.kv_dtype, "attention": a.attention, **ceiling,
                     "save_GBps": round(st.st_blocks * 512 / save_s / 1e9, 2),
                     "resume_GBps": round(st.st_blocks * 512 / (t3 - t2) / 1e9, 2),
                     "load_s": round(load_s, 2), **filled, "save_s": round(save_s, 1),
                     "file_apparent_GiB": round(st.st_size / 2**30, 2),
                     "file_on_disk_GiB": round(st.st_blocks * 512 / 2**30, 2),
                     "resume_s": round(t3 - t2, 2), "question_s": round(t4 - t3, 2), "index_rows": not a.no_rows,
                     "index_read_GiB": round(getattr(getattr(s, "_prompt_cache_attached", None), "index_bytes", 0)
                                             / 2**30, 3),
                     "first_token_after_start_s": round(load_s + t4 - t2, 2),
                     **{f"decode_{k}_ms": v for k, v in before.items()},
                     **{f"resumed_decode_{k}_ms": v for k, v in after.items()}, "plan": llm.plan.summary()})
        print(rows[-1], file=sys.stderr, flush=True)
        s.close()
        path.unlink()
        llm.close()
        del s, llm
        gc.collect()
    return rows


def resume_rows(a) -> list[dict]:
    from offload import cache_attach
    rows = []
    work = Path(a.dir or tempfile.mkdtemp(prefix="pcbench-"))
    real = cache_attach.attachable
    for n in _parse_tokens(a.resume_sizes):
        opts = dict(device=a.device, ctx=n + a.question + 64, attention=a.attention, gpu_mem=a.gpu_mem,
                    host_mem=a.host_mem, disk_dir=a.disk_dir or str(work / "kv"))
        if a.load_format:
            opts["load_format"] = a.load_format
        llm = LLM(a.model, **opts)
        path = work / f"resume-{n}.kvc"
        s = llm.session()
        ids = write_cache(s, path, n)
        s.close()
        size = path.stat().st_size
        question = torch.randint(3, llm.model_config.vocab_size, (a.question,),
                                 generator=torch.Generator().manual_seed(1)).tolist()
        for mode in ("in place", "copy-in"):
            cache_attach.attachable = real if mode == "in place" else (lambda attn, reader: "bench: copy-in")
            _drop_cached(path)
            s = llm.session()
            disk = s.attn.store.tiers[2]
            t0 = time.perf_counter()
            s.prefill(ids, prompt_cache=path)
            sync()
            t1 = time.perf_counter()
            tok = int(s.prefill(question).argmax()) if question else -1
            sync()
            t2 = time.perf_counter()
            info = getattr(s, "_prompt_cache_attached", None)
            rows.append({"tokens": n, "file_GiB": round(size / 2**30, 3), "mode": mode,
                         "resume_s": round(t1 - t0, 3), "question_s": round(t2 - t1, 3),
                         "first_token_s": round(t2 - t0, 3),
                         "attention": a.attention,
                         "eager_read_GiB": round((info.eager_bytes if info else size) / 2**30, 3),
                         "index_keys_read_GiB": round((info.index_bytes if info else 0) / 2**30, 3),
                         "in_place_GiB": round((info.in_place_bytes if info else 0) / 2**30, 3),
                         "spill_written_GiB": round(disk.bytes_written / 2**30, 3), "first_token": tok})
            s.close()
        cache_attach.attachable = real
        path.unlink()
        llm.close() if hasattr(llm, "close") else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resume-sizes", default=None, help="e.g. 16K,64K: the resume bench (in place vs copy-in)")
    ap.add_argument("--question", type=int, default=16, help="question tokens prefilled after a resume")
    ap.add_argument("--synthetic", default=None, help="e.g. 1M: save + resume a session filled with synthetic KV")
    ap.add_argument("--kv-dtype", default="int4")
    ap.add_argument("--synthetic-gpu-mem", default=None, help="the synthetic session's GPU KV tier (default: planned)")
    ap.add_argument("--no-rows", action="store_true", help="save no index rows (a sparse resume reads the keys)")
    ap.add_argument("--budget", default="2K")
    ap.add_argument("--steps", type=int, default=34, help="decode steps timed before and after the resume")
    ap.add_argument("--load-format", default=None)
    ap.add_argument("--gpu-mem", default="32MiB")
    ap.add_argument("--host-mem", default="64MiB")
    ap.add_argument("--gpu-cap", type=float, default=None)
    ap.add_argument("--disk-dir", default=None, help="the disk tier's folder (default: DIR/kv)")
    ap.add_argument("--attention", default="full", help="full (exact over tiers) | sparse (the index is rebuilt)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="where the cache file goes (default: a temp dir)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ.setdefault("OFFLOAD_NO_PROGRESS", "1")
    if a.synthetic:
        if a.gpu_cap:
            cap_gpu(a.gpu_cap)
        rows = synthetic_rows(a)
        write_results("prompt_cache_synthetic", rows, a.out, {"model": a.model, "command": " ".join(sys.argv)})
        return
    if a.resume_sizes:
        if a.gpu_cap:
            cap_gpu(a.gpu_cap)
        rows = resume_rows(a)
        write_results("prompt_cache_resume", rows, a.out, {"model": a.model, "question_tokens": a.question,
                                                           "gpu_mem": a.gpu_mem, "host_mem": a.host_mem,
                                                           "command": " ".join(sys.argv)})
        return
    llm = LLM(a.model, device=a.device, ctx=a.doc_tokens + 1024)
    doc = document_ids(llm, a.doc_tokens)
    question = llm.tokenizer.encode("\nWhich shelf holds the crate with the most lamps?", add_special_tokens=False)
    work = Path(a.dir or tempfile.mkdtemp(prefix="pcbench-"))
    times = {"no cache": [], "first run (writes the cache)": [], "resumed": []}
    tokens = set()
    for rep in range(a.reps):
        cache = work / f"doc-{rep}.kvc"
        for name, c in (("no cache", None), ("first run (writes the cache)", cache), ("resumed", cache)):
            s = llm.session()
            dt, tok = first_token(s, doc, question, c)
            s.close()
            times[name].append(dt)
            tokens.add(tok)
    size = (work / "doc-0.kvc").stat().st_size
    base = median(times["no cache"])
    rows = [{"run": k, "ttft_s": round(median(v), 3), "vs no cache": round(median(v) / base, 3),
             "all_s": [round(x, 3) for x in v]} for k, v in times.items()]
    for r in rows:
        r["cache_file_MiB"] = round(size / 2**20, 1)
    assert len(tokens) == 1, "the first token must not depend on the cache"
    write_results("prompt_cache", rows, a.out, {"model": llm.name, "doc_tokens": len(doc),
                                                "question_tokens": len(question), "dtype": str(llm.dtype),
                                                "command": " ".join(sys.argv)})
    for p in work.glob("doc-*.kvc"):
        p.unlink()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
