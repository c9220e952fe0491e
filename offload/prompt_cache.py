"""Prompt cache: prefill a long prompt once, resume it in later runs, checkpoint it while it is prefilled.

    logits = sess.prefill(ids, prompt_cache="book.kvc")     # API (an empty session)
    offload-chat --prompt-cache book.kvc -f book.txt        # CLI: caches the document part of the first turn

A cache is reused only when its key matches (model identity: weight files' size, mtime and a hash of their
first MiB, the architecture and a sample of the weights; the options that change KV: dtype, prefill chunk,
attention mode, kv dtype / prefill mode when present), the ctx holds it, and its token ids are a prefix of
the new prompt's; then only the rest is prefilled. Anything else (another model or options, a different
document, a truncated or corrupt file) prints one line on stderr, prefills afresh and replaces the file;
the old file stays intact until the new one's first commit is on disk (offload.kvfile).

A session with a bf16 disk tier resumes without copying the file: its disk tier reads the cache's cold blocks
where they lie, and only what the GPU and host tiers hold is read at resume (offload/cache_attach.py).

A long prefill runs in segments and commits every `prompt_cache_every` tokens (default 64K once the
prompt is >= 128K tokens), and once more on Ctrl-C / SIGTERM, so an interrupted prefill resumes where it
stopped. A checkpoint writes only the blocks added since the last one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch

from offload.errors import CapacityError, ConfigError, SessionFileError, TierIOError
from offload import cache_blocks
from offload.cache_blocks import CacheSaver, note, session_layout
from offload.kvfile import KVFileReader, KVFileWriter
from offload.progress import progress_bar

AUTO_EVERY = 64 * 1024            # checkpoint interval once a prompt is long enough to be worth it
AUTO_MIN_PROMPT = 128 * 1024
SEGMENT_MAX = 16 * 1024           # an interrupt loses at most one segment of work
_HEAD_BYTES = 1 << 20             # bytes hashed at the start of each weight file (its header and then some)
_KV_OPTIONS = ("prefill_chunk", "stream_chunk", "kv_dtype", "prefill")   # config options that change the KV values
_CUDA_ONLY = ("stream_chunk",)    # engine/runner.py uses it on CUDA only


def _weight_files(llm) -> list[Path]:
    if llm.config.load_format == "dummy":
        return []
    src = Path(str(llm.config.model)).expanduser()
    if not src.exists():
        src = None
        for mod in ("offload.model.loaders.resolve", "offload.model.resolve"):
            try:
                src = Path(__import__(mod, fromlist=["resolve_model"]).resolve_model(llm.config.model).path)
                break
            except Exception:   # noqa: BLE001  (the key then rests on the config and the weight sample)
                continue
    if src is None:
        return []
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
    return [src]


def _file_id(p: Path) -> str:
    st = p.stat()
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()[:16]
    return f"{p.name}:{st.st_size}:{st.st_mtime_ns}:{head}"


def cache_key(sess) -> dict:
    """What must match for a cached prompt's KV to be this session's: ordered, so a mismatch names a field."""
    from offload.persist import model_fingerprint
    llm, cfg = sess.llm, sess.config
    key = {"model": llm.name, "model files": [_file_id(p) for p in _weight_files(llm)],
           "architecture": hashlib.sha256(json.dumps(vars(llm.model.cfg), sort_keys=True, default=str).encode()
                                          ).hexdigest()[:16],
           "weights": model_fingerprint(llm.model),
           "dtype": str(llm.model.dtype).replace("torch.", ""), "attention": getattr(sess.attn, "mode", "full")}
    for name in _KV_OPTIONS:
        if name in _CUDA_ONLY and llm.model.device.type != "cuda":
            continue            # no effect off CUDA: a CPU cache made before the option existed stays valid
        if hasattr(cfg, name):
            key[name] = getattr(cfg, name)
    packed = getattr(getattr(sess.attn, "store", None), "packed", None)
    if packed is not None and not packed.layout.endswith(".v1"):
        key["kv layout"] = packed.layout    # a packed layout changed since v1: older files of it prefill afresh
    return json.loads(json.dumps(key, default=str))


def _mismatch(cached: dict, now: dict) -> str | None:
    for field in now:
        if cached.get(field) != now[field]:
            a, b = ("-" if x is None else str(x) if not isinstance(x, list) else ",".join(x) or "-"
                    for x in (cached.get(field), now[field]))
            short = lambda s: s if len(s) <= 40 else s[:37] + "..."  # noqa: E731
            return f"{field} differs (cached {short(a)}, now {short(b)})"
    return None


def checkpoint_every(value, n_tokens: int) -> int:
    """Tokens between checkpoints: the option, else 64K for prompts of 128K tokens or more; 0 = only at the end."""
    if value is None:
        return AUTO_EVERY if n_tokens >= AUTO_MIN_PROMPT else 0
    return int(value)


def _commits_untouched_mid_forward(attn) -> bool:
    from offload.engine.dense import DenseAttention
    return isinstance(attn, DenseAttention)


def _load(sess, reader, path: Path) -> str:
    """Put the cache's KV into the empty session: in place when its disk tier can read the file's blocks
    (offload.cache_attach), else copied in layer by layer. Returns how, for the resume note."""
    from offload.cache_attach import attach, attach_packed, attachable
    lay = reader.layout
    big = reader.committed_blocks * lay.layers * (lay.packed_stride or lay.stride) >= cache_blocks.PROGRESS_BYTES
    show = sess.llm.show_progress if big else False
    with progress_bar(f"resuming {path.name} (layers)", lay.layers, show=show) as up:
        if lay.packed_bytes:
            info = attach_packed(sess.attn, reader, on_layer=up)
            return f" ({_size(info.eager_bytes)} read, packed {lay.kv_dtype} blocks kept as they are)"
        if attachable(sess.attn, reader) is not None:
            sess.attn.load_kv(_counted(reader.layers(), up))
            return ""
        info = attach(sess.attn, reader, _fix(path), on_layer=up)
    sess._prompt_cache_attached = info
    return (f" ({_size(info.eager_bytes)} read, {_size(info.in_place_bytes)} read in place when needed"
            + (f", {_size(info.index_bytes)} read for the sparse index" if info.index_bytes else "") + ")")


def _counted(layers, update):
    """The (k, v) of each layer, reporting how many were taken."""
    for i, kv in enumerate(layers):
        yield kv
        update(i + 1)


def _size(n: int) -> str:
    for unit, b in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= b:
            return f"{n / b:.1f} {unit}"
    return f"{n} B"


def _reset(sess) -> None:
    """A fresh, empty backend for a session whose load failed half way (nothing of the bad file stays)."""
    llm, cfg = sess.llm, sess.config
    over = {f: getattr(cfg, f) for f in cfg.field_names() if getattr(cfg, f) != getattr(llm.config, f)}
    sess.attn.close()
    held = getattr(sess, "tier_bytes", None)        # this session's share of the LLM's KV budget, now freed
    if held is not None:
        sess.tier_bytes = (0, 0, 0)
    try:
        fresh = llm.session(**over)
    except BaseException:
        if held is not None:
            sess.tier_bytes = held
        raise
    sess.attn, sess.engine, sess.tokens = fresh.attn, fresh.engine, []
    if held is not None:                             # the share moves with the KV: fresh is dropped unclosed
        sess.tier_bytes, fresh.tier_bytes = fresh.tier_bytes, (0, 0, 0)


def _sweep(folder: Path) -> None:
    """Remove the temp file of a cache write that a killed run left (it can be as large as the cache)."""
    try:
        from offload.persist import sweep_temps
    except ImportError:
        return
    sweep_temps(folder)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt while we prefill (so the checkpoint is written), unless someone handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _open(path: Path, key: dict, ids: list[int], sess) -> tuple[KVFileReader | None, str | None]:
    """The cache if it can serve a prefix of ids, else (None, why)."""
    if not path.exists():
        return None, f"none yet; prefilling {len(ids)} tokens and saving them"
    try:
        r = KVFileReader(path)
    except SessionFileError as e:
        return None, f"{e}; prefilling afresh, then replacing it"
    why = _mismatch(r.key, key)
    mc = sess.llm.model_config
    lay = r.layout
    if why is None and (lay.layers, lay.kv_heads, lay.head_dim, lay.vocab) != (
            mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.vocab_size):
        why = "KV layout differs"
    if why is None and lay.packed_bytes and lay != session_layout(sess, lay.block_tokens, lay.capacity):
        why = "its packed block layout differs from this session's"
    if why is None and r.n > sess.llm.ctx:
        why = f"it holds {r.n} tokens, more than ctx {sess.llm.ctx}"
    if why is None and (r.n > len(ids) or r.tokens != ids[:r.n]):
        first = next((i for i, (a, b) in enumerate(zip(r.tokens, ids)) if a != b), min(r.n, len(ids)))
        why = f"the prompt differs from token {first} on"
    return (r, None) if why is None else (None, f"{why}; prefilling afresh, then replacing it")


def _fix(path: Path) -> str:
    return f"delete {path} to prefill afresh"


def prefill_cached(sess, token_ids, path, every=None, on_segment=None, _corrupt: str | None = None) -> torch.Tensor:
    """Like sess.prefill(token_ids) on an empty session, through the cache at `path`.

    every: tokens between checkpoints (None: the session's prompt_cache_every, else the default);
    on_segment(done): called after each prefilled segment (tests interrupt here).
    _corrupt: why the cache was found corrupt while this call's first attempt read it (then it is not opened)."""
    ids = [int(t) for t in token_ids]
    path = Path(path).expanduser()
    if sess.length:
        raise ConfigError("a prompt cache fills an empty session; call prefill(ids, prompt_cache=...) first")
    if path.is_dir() or not path.parent.is_dir():
        raise ConfigError(f"prompt cache {path}: not a file in an existing directory; pass a file path")
    if not ids:
        raise ConfigError("prefill needs at least one token id")
    t0 = time.perf_counter()
    key = cache_key(sess)
    reader, why = _open(path, key, ids, sess) if _corrupt is None else (None, _corrupt)
    done, logits = 0, None
    if reader is not None:
        try:
            how = _load(sess, reader, path)
            done, logits = reader.n, reader.logits.to(sess.llm.device)
            sess.tokens = ids[:done]
            note(f"prompt cache {path}: resumed {done} of {len(ids)} tokens{how}" +
                 (f", prefilling the other {len(ids) - done}" if done < len(ids) else ""))
        except (SessionFileError, TierIOError, CapacityError) as e:
            _reset(sess)
            reader, why = None, f"{e}; prefilling afresh, then replacing it"
        finally:
            if reader is not None:
                reader.close()
    if why:
        note(f"prompt cache {path}: {why}")
    if done == len(ids):
        sess._ttft = time.perf_counter() - t0
        return logits
    cfg = sess.config
    C = reader.layout.block_tokens if reader is not None else cfg.chunk_tokens
    try:
        # extend only a file laid out as this session saves (a session of other chunks, or whose index keeps no
        # rows, cannot add the blocks or index rows the file's layout promises): else write a new one
        if (reader is not None and reader.layout.capacity >= len(ids) and done % C == 0
                and reader.layout == session_layout(sess, C, reader.layout.capacity)):
            writer = KVFileWriter.extend(reader)
        else:
            _sweep(path.parent)
            writer = KVFileWriter.create(path, session_layout(sess, C, len(ids)), key)
    except OSError as e:
        note(f"prompt cache {path}: cannot write it ({e.strerror or e}); continuing without it")
        writer = None
    saver = CacheSaver(path, writer, sess, ids)
    every = checkpoint_every(getattr(cfg, "prompt_cache_every", None) if every is None else every, len(ids))
    unit = math.lcm(cfg.prefill_chunk, C)   # segment ends on prefill chunks (exact) and on blocks (in place)
    every = -(-every // unit) * unit if every else 0
    # Only a dense backend keeps its committed KV untouched while a forward runs (it writes past its length);
    # the tiered one rewrites each finished layer's tail mid-forward. So an interrupt inside a segment is
    # checkpointed at once on a dense backend; a tiered one commits at every segment end instead (segments =
    # `every`: each segment re-stages the layer's history, so fewer segments are cheaper there).
    mid_safe = _commits_untouched_mid_forward(sess.attn)
    seg = len(ids) if not every else (-(-min(every, SEGMENT_MAX) // unit) * unit if mid_safe else every)
    inside = False
    try:
        with _sigterm_interrupts():
            while done < len(ids):
                end = min(len(ids), (done // seg + 1) * seg)   # on the segment grid, also after an odd resume
                inside = True
                logits = sess.prefill(ids[done:end])
                done, inside = end, False
                if on_segment is not None:
                    on_segment(done)
                if every and done < len(ids) and done - saver.n >= every:
                    saver.commit(done, logits, background=True)
    except (KeyboardInterrupt, SystemExit):
        if done and (mid_safe or not inside) and saver.commit(done, logits):
            note(f"prompt cache {path}: saved {done} of {len(ids)} tokens; run the same command again to resume")
        elif saver.n:
            note(f"prompt cache {path}: keeps {saver.n} of {len(ids)} tokens; run the same command again to resume")
        saver.close()
        raise
    except TierIOError as e:
        saver.close()
        if reader is None or str(path) not in str(e):
            raise
        # a block the disk tier reads in place from this cache is corrupt: nothing wrong was used (the read
        # failed); start again without it
        _reset(sess)
        return prefill_cached(sess, ids, path, every, on_segment,
                              _corrupt=f"{str(e).removesuffix('; ' + _fix(path))}; prefilling afresh, then replacing it")
    except BaseException:
        saver.close()
        raise
    try:
        saver.commit(done, logits)
    finally:
        saver.close()
    sess._ttft = time.perf_counter() - t0
    return logits


def check_path(path, has_document: bool = True) -> None:
    """Refuse an unusable cache path before any weight loads (CLI)."""
    p = Path(path).expanduser()
    if p.is_dir() or not p.parent.is_dir():
        raise ConfigError(f"--prompt-cache {path}: not a file in an existing directory; pass a file path like ./book.kvc")
    if p.exists() and not os.access(p, os.R_OK | os.W_OK):
        raise ConfigError(f"--prompt-cache {path}: not readable and writable; fix its permissions or pass another path")
    if not has_document:
        note(f"prompt cache {path}: it caches the -f/--file document; without one it is not used")


def prime_chat(chat, document: str, path) -> None:
    """Prefill the first turn's document (everything the chat template puts before the question) through
    the cache, so chat.stream(document + "\\n\\n" + question) then prefills only the question."""
    tok = chat.llm.tokenizer
    mark = "\x00offload-question\x00"
    rendered, spans = tok.render_chat(chat.messages + [{"role": "user", "content": f"{document}\n\n{mark}"}],
                                      add_generation_prompt=True)
    i = rendered.find(mark)
    if i < 0 or not rendered[:i].endswith("\n\n"):
        note(f"prompt cache {path}: this chat template hides where the document ends; not using the cache")
        return
    prefix = rendered[:i - 2]
    # the document is user text: a control token spelled in it stays text (as chat.stream encodes it)
    user = [(a, min(b, len(prefix))) for a, b in spans if a < len(prefix)]
    chat.session.prefill(tok.encode_chat(prefix, user), prompt_cache=path)
    chat._cached_text = prefix
