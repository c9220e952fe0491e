"""GGUF block formats kept as planes: what each quantized weight type stores, and its torch reference.

A GGUF row of K weights is a run of blocks (34 bytes per 32 weights for Q8_0, 144 per 256 for Q4_K...).
The block's fields are 2-byte aligned at best, which costs a GPU kernel byte loads; so at load each
field becomes its own row-major plane ([rows, ...]: the quants, the scales), the same bytes in a layout a
kernel reads with 16-byte loads. Every plane is row-major, so rows can be concatenated (fused q|k|v),
permuted (llama.cpp's rotary order) or gathered (embedding lookup) without touching the blocks.

    planes = from_gguf_bytes("Q4_K", raw)         # raw: uint8 [rows, K/256*144] -> {"qs": ..., "meta": ...}
    w = dequantize("Q4_K", planes)                # float32 [rows, K], bit-equal to gguf.quants.dequantize
    planes = quantize("Q8_0", w)                  # torch quantizer (bf16 checkpoints at load, --weights)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block: int                               # weights per block
    block_bytes: int                         # bytes per block in the GGUF file
    fields: tuple[tuple[str, int, int], ...]   # (plane, byte offset in the block, bytes per block)


FORMATS = {f.name: f for f in (
    BlockFormat("Q8_0", 32, 34, (("d", 0, 2), ("qs", 2, 32))),
    BlockFormat("Q4_0", 32, 18, (("d", 0, 2), ("qs", 2, 16))),
    BlockFormat("Q4_1", 32, 20, (("dm", 0, 4), ("qs", 4, 16))),           # dm: f16 scale, f16 min
    BlockFormat("Q4_K", 256, 144, (("meta", 0, 16), ("qs", 16, 128))),    # meta: d, dmin, 12 bytes of 6-bit scales
    BlockFormat("Q6_K", 256, 210, (("ql", 0, 128), ("qh", 128, 64), ("sc", 192, 16), ("d", 208, 2))),
)}
SUPPORTED = tuple(FORMATS)
# --weights: what a bf16 tensor is quantized to at load
TARGETS = {"q8_0": "Q8_0", "q4": "Q4_K"}


def fit(fmt: str | None, cols: int) -> str | None:
    """The format a row of `cols` weights gets when `fmt` is asked: Q4_K needs whole 256-weight super-blocks
    (Q4_1 otherwise, as llama.cpp falls back for such rows; Q6_K falls back to Q8_0), 32-weight formats whole
    blocks (else dense: None)."""
    if fmt is None or cols % FORMATS[fmt].block == 0:
        return fmt
    if cols % 32:
        return None
    return {"Q4_K": "Q4_1", "Q6_K": "Q8_0"}.get(fmt)


def bits_per_weight(fmt: str) -> float:
    f = FORMATS[fmt]
    return 8 * f.block_bytes / f.block


def from_gguf_bytes(fmt: str, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """raw: uint8 [rows, nblocks * block_bytes] as stored in the file -> planes, each uint8 [rows, nblocks * bytes]."""
    f = FORMATS[fmt]
    rows = raw.shape[0]
    if raw.device.type == "cpu":   # numpy copies these narrow strided slices ~50x faster than torch on the CPU
        blocks = raw.numpy().reshape(rows, -1, f.block_bytes)  # blocks: [R, nb, block_bytes]
        return {name: torch.from_numpy(np.ascontiguousarray(blocks[:, :, off:off + n]).reshape(rows, -1))
                for name, off, n in f.fields}
    blocks = raw.reshape(rows, -1, f.block_bytes)  # blocks: [R, nb, block_bytes]
    return {name: blocks[:, :, off:off + n].reshape(rows, -1).contiguous() for name, off, n in f.fields}


def to_gguf_bytes(fmt: str, planes: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of from_gguf_bytes: uint8 [rows, nblocks * block_bytes] (to write a file, to compare bytes)."""
    f = FORMATS[fmt]
    rows = next(iter(planes.values())).shape[0]
    parts = [planes[name].reshape(rows, -1, n) for name, _, n in f.fields]  # each: [R, nb, n]
    return torch.cat(parts, dim=2).reshape(rows, -1)


def _f16(p: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 2n] -> float32 [R, n] read as little-endian float16."""
    return p.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """uint8 [R, m] where each run of `run` bytes holds 2*run weights (low nibbles first) -> uint8 [R, 2m]."""
    rows = qs.shape[0]
    q = qs.reshape(rows, -1, 1, run)  # q: [R, m/run, 1, run]
    return torch.cat([q & 15, q >> 4], dim=2).reshape(rows, -1)


def _k_scales(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K meta uint8 [R, nb*16] -> d, dmin: float32 [R, nb, 1]; sc, mn: float32 [R, nb, 8] (6-bit each)."""
    rows = meta.shape[0]
    m = meta.reshape(rows, -1, 16)  # m: [R, nb, 16]
    d, dmin = _f16(m[:, :, 0:2]).reshape(rows, -1, 1), _f16(m[:, :, 2:4]).reshape(rows, -1, 1)
    s = m[:, :, 4:16].long()  # s: [R, nb, 12]
    lo, hi, mix = s[:, :, 0:4], s[:, :, 4:8], s[:, :, 8:12]
    sc = torch.cat([lo & 63, (mix & 15) | ((lo >> 2) & 48)], dim=2).float()
    mn = torch.cat([hi & 63, (mix >> 4) | ((hi >> 2) & 48)], dim=2).float()
    return d, dmin, sc, mn


def dequantize(fmt: str, planes: dict[str, torch.Tensor]) -> torch.Tensor:
    """planes -> float32 [R, K]; the same float32 operations in the same order as gguf.quants (bit-equal)."""
    rows = planes["qs" if "qs" in planes else "ql"].shape[0]
    if fmt == "Q8_0":
        q = planes["qs"].view(torch.int8).reshape(rows, -1, 32).float()  # q: [R, nb, 32]
        return (q * _f16(planes["d"])[:, :, None]).reshape(rows, -1)
    if fmt == "Q4_0":
        q = (_nibbles(planes["qs"], 16).view(torch.int8) - 8).reshape(rows, -1, 32).float()
        return (_f16(planes["d"])[:, :, None] * q).reshape(rows, -1)
    if fmt == "Q4_1":
        dm = _f16(planes["dm"]).reshape(rows, -1, 2)  # dm: [R, nb, 2]
        q = _nibbles(planes["qs"], 16).reshape(rows, -1, 32).float()
        return (dm[:, :, :1] * q + dm[:, :, 1:]).reshape(rows, -1)
    if fmt == "Q4_K":
        d, dmin, sc, mn = _k_scales(planes["meta"])
        q = _nibbles(planes["qs"], 32).reshape(rows, -1, 8, 32).float()  # q: [R, nb, 8, 32]
        return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(rows, -1)
    if fmt == "Q6_K":
        ql = _nibbles(planes["ql"], 64).reshape(rows, -1, 256)  # ql: [R, nb, 256] low 4 bits
        qh = planes["qh"].reshape(rows, -1, 2, 32)  # qh: [R, nb, 2, 32]
        # no host-made shift tensor: this runs inside CUDA-graph captures (embedding rows)
        qh = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3).reshape(rows, -1, 256)  # high 2 bits
        q = ((ql | (qh << 4)).view(torch.int8) - 32).reshape(rows, -1, 16, 16).float()
        d = _f16(planes["d"]).reshape(rows, -1, 1)  # d: [R, nb, 1]
        sc = planes["sc"].view(torch.int8).reshape(rows, -1, 16).float()
        return ((d * sc)[..., None] * q).reshape(rows, -1)
    raise ValueError(f"no block format {fmt!r}")


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (halves away from zero), as llama.cpp and gguf's Q8_0 quantizer round."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [R, n] -> uint8 [R, 2n] of float16 values."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def quantize(fmt: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """float [R, K] -> planes. Q8_0 follows ggml's reference quantizer bit for bit; Q4_K sets each 32-weight
    sub-block's scale and min from its range (ggml searches them; same layout, slightly larger error)."""
    rows = w.shape[0]
    x = w.float().reshape(rows, -1, 32)  # x: [R, nb, 32]
    if fmt == "Q8_0":
        d = x.abs().amax(-1) / 127  # d: [R, nb]
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _roundf(x * inv[..., None]).to(torch.int8)
        return {"d": _f16_bytes(d), "qs": q.view(torch.uint8).reshape(rows, -1)}
    if fmt == "Q4_K":
        x = x.reshape(rows, -1, 8, 32)  # x: [R, nb, 8, 32]
        lo = x.amin(-1).clamp(max=0)  # lo: [R, nb, 8] (the min is subtracted, so it is <= 0)
        scale, mins = (x.amax(-1) - lo) / 15, -lo
        d, dmin = scale.amax(-1) / 63, mins.amax(-1) / 63  # d, dmin: [R, nb]
        d16, dmin16 = d.half().float(), dmin.half().float()
        inv_d = torch.where(d16 == 0, torch.zeros_like(d16), 1 / d16)
        inv_m = torch.where(dmin16 == 0, torch.zeros_like(dmin16), 1 / dmin16)
        sc = _roundf(scale * inv_d[..., None]).clamp(0, 63)  # sc: [R, nb, 8]
        mn = _roundf(mins * inv_m[..., None]).clamp(0, 63)
        step = d16[..., None] * sc  # step: [R, nb, 8]
        inv_s = torch.where(step == 0, torch.zeros_like(step), 1 / step)
        q = _roundf((x + (dmin16[..., None] * mn)[..., None]) * inv_s[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.reshape(rows, -1, 4, 2, 32)  # q: [R, nb, 4 runs of 64, 2 halves, 32]
        qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, -1)
        sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
        packed = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], dim=-1)  # packed: [R, nb, 12]
        meta = torch.cat([_f16_bytes(d16).reshape(rows, -1, 2), _f16_bytes(dmin16).reshape(rows, -1, 2),
                          packed], dim=-1)  # meta: [R, nb, 16]
        return {"meta": meta.reshape(rows, -1), "qs": qs}
    if fmt == "Q6_K":
        x = x.reshape(rows, -1, 16, 16)  # x: [R, nb, 16 groups, 16]
        amax = x.abs().amax(-1)  # amax: [R, nb, 16]
        d = (amax / 32).amax(-1) / 127  # d: [R, nb] (group scales are int8 multiples of d)
        d16 = d.half().float()
        inv_d = torch.where(d16 == 0, torch.zeros_like(d16), 1 / d16)
        sc = _roundf(amax / 32 * inv_d[..., None]).clamp(-128, 127)  # sc: [R, nb, 16]
        step = d16[..., None] * sc
        inv_s = torch.where(step == 0, torch.zeros_like(step), 1 / step)
        q = (_roundf(x * inv_s[..., None]).clamp(-32, 31) + 32).to(torch.uint8).reshape(rows, -1, 256)
        lo, hi = q & 15, q >> 4  # lo, hi: [R, nb, 256]
        lo = lo.reshape(rows, -1, 2, 2, 64)  # per half of 128: two runs of 64 share 64 bytes (low, high nibble)
        ql = (lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(rows, -1)
        hi = hi.reshape(rows, -1, 2, 4, 32)  # per half: four runs of 32 share 32 bytes (2 bits each)
        qh = (hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)).reshape(rows, -1)
        return {"ql": ql, "qh": qh, "sc": sc.to(torch.int8).view(torch.uint8).reshape(rows, -1), "d": _f16_bytes(d16)}
    if fmt in ("Q4_0", "Q4_1"):   # ggml's reference rounding (gguf.quants mirrors it)
        lo, hi = x.amin(-1), x.amax(-1)  # lo, hi: [R, nb]
        if fmt == "Q4_0":
            pick = torch.where(hi.abs() > lo.abs(), hi, lo)   # the value of largest magnitude, with its sign
            d = pick / -8
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc(x * inv[..., None] + 8.5).clamp(0, 15).to(torch.uint8)
            head = _f16_bytes(d)
        else:
            d = (hi - lo) / 15
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc((x - lo[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
            head = torch.stack([_f16_bytes(d).reshape(rows, -1, 2), _f16_bytes(lo).reshape(rows, -1, 2)], 2)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, -1)
        return {"d" if fmt == "Q4_0" else "dm": head.reshape(rows, -1), "qs": qs}
    raise ValueError(f"no quantizer for {fmt!r}; quantize to one of {', '.join(TARGETS.values())}")


def scale_planes(fmt: str, planes: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The float16 scale fields of `planes` as float32 (to refuse NaN/inf scales at load)."""
    if fmt == "Q4_K":
        m = planes["meta"].reshape(planes["meta"].shape[0], -1, 16)
        return [_f16(m[:, :, 0:4])]
    return [_f16(planes[name]) for name in ("d", "dm") if name in planes]
