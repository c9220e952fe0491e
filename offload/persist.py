"""Saved sessions: a prefilled context written once and resumed later with identical logits.

File layout (little-endian):
    b"OFFLOADKV" | u32 version | u64 header length | header JSON | u32 crc32(header)
    then, per layer, per record of up to RECORD_TOKENS tokens: u64 payload length | u32 crc32 | K bytes | V bytes
The header holds the model fingerprint, ctx, layout (layers, KV heads, head dim, dtype) and the token ids.
Written atomically: a 0600 temp file `.<name>.offload-tmp-<pid>` in the same directory, fsync, rename, fsync
of the directory. A save killed half-way leaves its temp file; the next save or load in that directory removes
temp files of that exact pattern whose writer process is gone (nothing else is ever touched).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import sys
import zlib
from pathlib import Path

import torch

from offload.errors import ConfigError, SessionFileError
from offload.files import pid_alive, regular_file

MAGIC = b"OFFLOADKV"
VERSION = 1
RECORD_TOKENS = 4096
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_TEMP = re.compile(r"\..+\.offload-tmp-(\d+)")
_FIX = "save the session again"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.offload-tmp-{os.getpid()}")


def sweep_temps(folder: Path) -> list[Path]:
    """Remove save temp files (our exact name pattern, regular, ours) whose writing process is gone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        p = folder / name
        try:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def model_fingerprint(model) -> str:
    """Architecture plus a sample of weights, rounded to bf16 so CPU fp32 and GPU bf16 loads agree."""
    h = hashlib.sha256(json.dumps(vars(model.cfg), sort_keys=True, default=str).encode())
    for t in (model.embed[:8], model.lm_head[-8:], model.layers[0].wqkv[:4], model.layers[-1].w_down[:4]):
        h.update(t.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _write_record(f, k: torch.Tensor, v: torch.Tensor) -> None:
    payload = _tensor_bytes(k) + _tensor_bytes(v)
    f.write(struct.pack("<QI", len(payload), zlib.crc32(payload)))
    f.write(payload)


def _kv_dtype(sess) -> str:
    """What the session's host / disk tiers hold: bf16 (as computed) or int8 / int4 (packed)."""
    packed = getattr(getattr(sess.attn, "store", None), "packed", None)
    return packed.kv_dtype if packed is not None else "bf16"


def _kv_layout(sess) -> str:
    """The packed layout of those tiers ("bf16", "int8.v2", ...): the saved values carry its rounding."""
    packed = getattr(getattr(sess.attn, "store", None), "packed", None)
    return packed.layout if packed is not None else "bf16"


def save_session(sess, path, meta: dict | None = None) -> None:
    """meta: JSON the caller keeps with the KV (a chat's messages); load_session returns it."""
    attn, model = sess.attn, sess.llm.model
    if not hasattr(attn, "read_kv"):
        raise ConfigError("this attention backend cannot save sessions; use --attention full")
    path = Path(path)
    if os.path.lexists(path):     # overwrite a previous session file, never a folder, device or FIFO
        regular_file(path, "session file", "pass a new or regular file path to save()", SessionFileError)
    sweep_temps(path.parent)
    mc = model.cfg
    header = {"version": VERSION, "fingerprint": model_fingerprint(model), "model": sess.llm.name,
              "ctx": sess.llm.ctx, "length": sess.length, "tokens": sess.tokens, "kv_dtype": _kv_dtype(sess),
              "kv_layout": _kv_layout(sess),
              "layout": {"num_layers": mc.num_layers, "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                         "dtype": str(model.dtype).replace("torch.", ""), "record_tokens": RECORD_TOKENS}}
    if meta is not None:
        header["meta"] = meta
    hb = json.dumps(header).encode()
    tmp = _temp_path(path)
    try:
        # 0600 from the start: the file holds the context's tokens
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as f:
            f.write(MAGIC + struct.pack("<IQ", VERSION, len(hb)) + hb + struct.pack("<I", zlib.crc32(hb)))
            for layer in range(mc.num_layers):
                k, v = attn.read_kv(layer)  # k, v: [Hkv, length, D]
                for s in range(0, max(sess.length, 1), RECORD_TOKENS):
                    _write_record(f, k[:, s:s + RECORD_TOKENS], v[:, s:s + RECORD_TOKENS])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass                  # the folder itself vanished or turned read-only
        raise SessionFileError(f"cannot write session {path} ({e.strerror or e}); check that the folder exists and "
                               "is writable and has free space, or pick another path") from None


def _read_exact(f, n: int, path) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise SessionFileError(f"session file {path} is truncated; save the session again")
    return b


def _read_header(f, path) -> dict:
    if f.read(len(MAGIC)) != MAGIC:
        raise SessionFileError(f"{path} is not an offload session file; pass a file written by sess.save()")
    version, hlen = struct.unpack("<IQ", _read_exact(f, 12, path))
    if version != VERSION:
        raise SessionFileError(f"session file {path} has format version {version}, this offload reads {VERSION}; save it again")
    if hlen > 1 << 31:
        raise SessionFileError(f"session file {path} has a corrupt header; save the session again")
    hb = _read_exact(f, hlen, path)
    (crc,) = struct.unpack("<I", _read_exact(f, 4, path))
    if zlib.crc32(hb) != crc:
        raise SessionFileError(f"session file {path} has a corrupt header (checksum mismatch); save the session again")
    try:
        header = json.loads(hb.decode("utf-8"))
    except (UnicodeError, ValueError) as e:
        raise SessionFileError(f"session file {path} has a header that is not UTF-8 JSON ({e}); {_FIX}") from None
    return _checked_header(header, path)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_header(h, path) -> dict:
    """Every field present with its type and consistent with the others (a checksum only proves the bytes)."""
    def bad(what):
        return SessionFileError(f"session file {path} has a malformed header ({what}); {_FIX}")
    if not isinstance(h, dict):
        raise bad(f"a {type(h).__name__}, not an object")
    want = {"fingerprint": str, "model": str, "ctx": int, "length": int, "tokens": list, "layout": dict}
    for key, kind in want.items():
        if key not in h:
            raise bad(f"no {key!r}")
        if not isinstance(h[key], kind) or (kind is int and not _is_int(h[key])):
            raise bad(f"{key!r} is a {type(h[key]).__name__}, not a {kind.__name__}")
    lay = h["layout"]
    for key in ("num_layers", "num_kv_heads", "head_dim", "record_tokens"):
        if not _is_int(lay.get(key)) or lay[key] <= 0:
            raise bad(f"layout {key!r} is {lay.get(key)!r}")
    if lay["record_tokens"] != RECORD_TOKENS:
        raise bad(f"record_tokens {lay['record_tokens']}, this offload writes {RECORD_TOKENS}")
    if lay.get("dtype") not in _DTYPES:
        raise bad(f"dtype {lay.get('dtype')!r}")
    if h.get("kv_dtype", "bf16") not in ("bf16", "int8", "int4"):
        raise bad(f"kv_dtype {h.get('kv_dtype')!r}")
    if not isinstance(h.get("kv_layout", ""), str):
        raise bad(f"kv_layout {h.get('kv_layout')!r}")
    n, tokens = h["length"], h["tokens"]
    if n < 0 or n > h["ctx"] or len(tokens) != n:
        raise bad(f"length {n}, {len(tokens)} token ids, ctx {h['ctx']}")
    if not all(_is_int(t) and t >= 0 for t in tokens):
        raise bad("a token id that is not a non-negative integer")
    return h


def load_session(sess, path) -> dict | None:
    """Fill an empty session from `path`, refusing files of other models, layouts or corrupt records; returns
    the meta saved with it (None if none)."""
    path = Path(path)
    model, attn = sess.llm.model, sess.attn
    if not hasattr(attn, "load_kv"):
        raise ConfigError("this attention backend cannot load sessions; use --attention full")
    regular_file(path, "session file", "pass a file written by sess.save()", SessionFileError)
    sweep_temps(path.parent)
    with open(path, "rb") as f:
        h = _read_header(f, path)
        if h["fingerprint"] != model_fingerprint(model):
            raise SessionFileError(f"session file {path} was saved with another model ({h['model']}); "
                                   "load it with the model that wrote it")
        lay, mc = h["layout"], model.cfg
        shape = (lay["num_layers"], lay["num_kv_heads"], lay["head_dim"])
        if shape != (mc.num_layers, mc.num_kv_heads, mc.head_dim):
            raise SessionFileError(f"session file {path} holds KV of {shape} (layers, KV heads, head dim), this model "
                                   f"has {(mc.num_layers, mc.num_kv_heads, mc.head_dim)}; {_FIX} with this model")
        if any(t >= mc.vocab_size for t in h["tokens"]):
            raise SessionFileError(f"session file {path} holds a token id outside the vocabulary ({mc.vocab_size}); "
                                   f"it is corrupt: {_FIX}")
        dtype = str(model.dtype).replace("torch.", "")
        if lay["dtype"] != dtype:
            raise SessionFileError(f"session file {path} holds {lay['dtype']} KV but this runtime uses {dtype}; "
                                   f"pass --dtype {lay['dtype']}")
        n = h["length"]
        if n > sess.llm.ctx:
            raise SessionFileError(f"session file {path} holds {n} tokens, more than ctx {sess.llm.ctx}; raise --ctx")
        tdtype = _DTYPES[dtype]
        esz = torch.empty((), dtype=tdtype).element_size()
        Hkv, D = mc.num_kv_heads, mc.head_dim

        def layers(materialize: bool):
            for layer in range(mc.num_layers):
                ks, vs = [], []
                for r, s in enumerate(range(0, max(n, 1), RECORD_TOKENS)):
                    t = min(RECORD_TOKENS, n - s)
                    plen, crc = struct.unpack("<QI", _read_exact(f, 12, path))
                    if plen != 2 * Hkv * t * D * esz:
                        raise SessionFileError(f"session file {path} is corrupt at layer {layer} record {r}; save it again")
                    payload = _read_exact(f, plen, path)
                    if zlib.crc32(payload) != crc:
                        raise SessionFileError(f"session file {path} is corrupt at layer {layer} record {r} "
                                               "(checksum mismatch); save the session again")
                    if materialize:
                        kv = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(tdtype).view(2, Hkv, t, D)
                        ks.append(kv[0])
                        vs.append(kv[1])
                if materialize:
                    yield torch.cat(ks, 1).to(model.device), torch.cat(vs, 1).to(model.device)  # [Hkv, n, D] each
                else:
                    yield None

        # Pass 1 verifies every record, so a bad file leaves the session untouched; pass 2 loads layer by layer.
        body = f.tell()
        for _ in layers(False):
            pass
        if f.read(1):
            raise SessionFileError(f"session file {path} has trailing bytes; it is corrupt, save it again")
        f.seek(body)
        attn.load_kv(layers(True))
    saved, now = h.get("kv_dtype", "bf16"), _kv_dtype(sess)
    if saved == now != "bf16" and h.get("kv_layout", f"{saved}.v1") != _kv_layout(sess):
        # the same dtype in an older packed layout: its values are re-quantized in this one (one more rounding)
        print(f"session file {path}: saved with {saved} host KV of layout {h.get('kv_layout', f'{saved}.v1')}, "
              f"loaded into {_kv_layout(sess)} (its chunks are quantized again as they leave the GPU pool)",
              file=sys.stderr, flush=True)
    elif saved != now:
        # the file holds the values the saving session read (int8 / int4 chunks dequantized): converted, said once
        print(f"session file {path}: saved with {saved} host KV, loaded into a {now} session "
              + ("(its packed chunks keep their rounding)" if saved != "bf16" else
                 f"(chunks are quantized to {now} as they leave the GPU pool)"), file=sys.stderr, flush=True)
    sess.tokens = list(h["tokens"])
    return h.get("meta")
