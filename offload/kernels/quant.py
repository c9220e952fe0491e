"""Compressed KV chunks for the host and disk tiers (`kv_dtype` int8 / int4), with torch references.

A chunk [2, Hkv, C, D] packs into a fixed number of bytes, so a pool of packed chunks is a [S, B] uint8
tensor that tiers store, copy and CRC like any other. Layout of one packed chunk:

    [2, Hkv, part]          part = one KV head's K (index 0) or V (index 1), `part_bytes` each
    K part:  codes [C, D*bits/8] | scales [C/Gk, D, ns] fp16   keys per channel, over groups of Gk tokens
    V part:  codes [C, D*bits/8] | scales [C, D/Gv, ns] fp16   values per token, over groups of Gv channels
    codes:   int8 one byte per element; int4 two per byte along D (element 2i in the low nibble)
    scales:  (scale, min) fp16 pairs, x = code * scale + min (asymmetric)
Keys per channel and values per token is KIVI's / KVQuant's finding: key outliers sit in fixed channels,
value errors must stay local to a token. Gk = Gv = 32 (fewer when C or D is smaller); with C = 32,
D = 128 a chunk is 0.5625x its bf16 size in int8 and 0.3125x in int4. Measured on SmolLM2's real KV
(4K tokens, attention output error relative to exact, all layers): int8 0.0040 asymmetric vs 0.0097
symmetric (keys carry per-channel offsets); int4 0.068 asymmetric, 0.169 symmetric, 0.061 with a
Hadamard rotation of K and V along D (not used: 11 % less error is not worth rotating q and o per pool).

kv_dtype "bf16" is the uncompressed mode: a chunk's raw bytes (whatever the model's KV dtype is), so the
round trip is bit-identical; the compressed kernels are only used for int8 / int4.

gather_attend_q / gather_rows_q read pools that are raw ([S, 2, Hkv, C, D]) or packed ([S, B] uint8), in any
mix of pool and alt_pool (the GPU pool stays raw, the host slab is packed). On the GPU the CuPy kernels
(quant.cu) read the packed bytes in place, the host slab through UVA, and dequantize in registers, so a
host chunk crosses PCIe at its compressed size. The torch references dequantize the used slots first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .reference import ALT_SLOT

__all__ = ["KV_DTYPES", "PackedFormat", "PackedStorage", "packed_format", "quantize_chunks", "dequantize_chunks", "is_packed",
           "gather_attend_q", "gather_rows_q"]

KV_DTYPES = ("bf16", "int8", "int4")
_GROUP = 32            # Gk (tokens per key scale) and Gv (channels per value scale), capped by C and D
_F16_MAX = 65504.0


@dataclass(frozen=True)
class PackedFormat:
    """How one chunk [2, Hkv, C, D] is stored; `chunk_bytes` per pool slot."""

    kv_dtype: str                 # "bf16" (raw bytes) | "int8" | "int4"
    num_kv_heads: int
    chunk_tokens: int
    head_dim: int
    raw_dtype: torch.dtype = torch.bfloat16   # the uncompressed element type (what dequantize returns by default)

    def __post_init__(self):
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {self.kv_dtype!r}")
        c, d = self.chunk_tokens, self.head_dim
        if self.compressed and (c & (c - 1) or d % _GROUP and d & (d - 1) or d % 8 or c < 1):
            raise ValueError(f"compressed KV needs a power-of-two chunk size and a head_dim that is a multiple of "
                             f"8 and of 32 (or a power of two); got C={c}, D={d}")

    @property
    def compressed(self) -> bool:
        return self.kv_dtype != "bf16"

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}.get(self.kv_dtype, 8 * torch.empty((), dtype=self.raw_dtype).element_size())

    @property
    def scales_per_group(self) -> int:
        return 2          # (scale, min)

    @property
    def key_group(self) -> int:
        return min(_GROUP, self.chunk_tokens)

    @property
    def value_group(self) -> int:
        return min(_GROUP, self.head_dim)

    @property
    def code_bytes(self) -> int:
        """Codes of one part: [C, D*bits/8]."""
        return self.chunk_tokens * self.head_dim * self.bits // 8

    @property
    def scale_bytes(self) -> int:
        c, d, ns = self.chunk_tokens, self.head_dim, self.scales_per_group
        k = (c // self.key_group) * d * ns * 2
        v = c * (d // self.value_group) * ns * 2
        return -(-max(k, v) // 16) * 16

    @property
    def part_bytes(self) -> int:
        if not self.compressed:
            return self.chunk_tokens * self.head_dim * self.bits // 8
        return self.code_bytes + self.scale_bytes

    @property
    def chunk_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.part_bytes

    @property
    def storage(self) -> PackedStorage:
        return PackedStorage(self.num_kv_heads, self.chunk_tokens, self.chunk_bytes)

    @property
    def raw_chunk_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.chunk_tokens * self.head_dim * torch.empty((), dtype=self.raw_dtype).element_size()


@dataclass(frozen=True)
class PackedStorage:
    """What a tier needs to store packed chunks (the fields of tiers.base.ChunkShape it reads): [S, B] uint8."""
    num_kv_heads: int
    chunk_tokens: int
    nbytes: int                   # B: one packed chunk

    @property
    def shape(self) -> tuple[int]:
        return (self.nbytes,)

    @property
    def numel(self) -> int:
        return self.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8


def packed_format(kv_dtype: str, shape) -> PackedFormat:
    """The format of kv_dtype for a store's ChunkShape (num_kv_heads, chunk_tokens, head_dim, dtype)."""
    return PackedFormat(kv_dtype, shape.num_kv_heads, shape.chunk_tokens, shape.head_dim, shape.dtype)


def is_packed(pool: torch.Tensor | None) -> bool:
    """A packed pool is [S, B] uint8; a raw one is [S, 2, Hkv, C, D]."""
    return pool is not None and pool.dtype == torch.uint8 and pool.dim() == 2


# ---- quantize / dequantize ----------------------------------------------------------------------
def _quantize(x: torch.Tensor, dim: int, fmt: PackedFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, same shape as x) and fp16 scales (x's shape without `dim`, plus [ns]) over groups along dim."""
    x = x.clamp(-_F16_MAX, _F16_MAX)
    levels = (1 << fmt.bits) - 1
    lo16 = x.amin(dim).half()                                              # lo16: [...] fp16
    lo = lo16.float().unsqueeze(dim)
    # the step is computed from the rounded min, so codes span [0, levels] after rounding too
    step16 = ((x.amax(dim, keepdim=True) - lo) / levels).squeeze(dim).half()   # step16: [...] fp16
    step = step16.float().unsqueeze(dim)
    codes = torch.round((x - lo) / torch.where(step > 0, step, 1.0)).clamp(0, levels)
    scales = torch.stack([step16, lo16], dim=-1)                           # scales: [..., 2]
    return codes.to(torch.uint8), scales


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] uint8 codes -> [..., D*bits/8] bytes (int4: element 2i in the low nibble)."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D*bits/8] bytes -> [..., D] codes as float32."""
    if bits == 8:
        return data.float()
    lo, hi = data & 0xF, data >> 4                                         # [..., D/2] each
    return torch.stack([lo, hi], dim=-1).flatten(-2).float()


def quantize_chunks(kv: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
    """kv [n, 2, Hkv, C, D] -> packed [n, chunk_bytes] uint8 on kv's device (raw bytes for bf16)."""
    n, two, hkv, c, d = kv.shape
    if (two, hkv, c, d) != (2, fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim):
        raise ValueError(f"kv {list(kv.shape)} does not match the format's [n, 2, {fmt.num_kv_heads}, "
                         f"{fmt.chunk_tokens}, {fmt.head_dim}]")
    if not fmt.compressed:
        return kv.to(fmt.raw_dtype).contiguous().view(torch.uint8).reshape(n, fmt.chunk_bytes)  # [n, B]
    gk, gv = fmt.key_group, fmt.value_group
    x = kv.float()                                                         # x: [n, 2, Hkv, C, D]
    kc, ks = _quantize(x[:, 0].reshape(n, hkv, c // gk, gk, d), 3, fmt)    # kc: [n, Hkv, C/Gk, Gk, D]
    vc, vs = _quantize(x[:, 1].reshape(n, hkv, c, d // gv, gv), 4, fmt)    # vc: [n, Hkv, C, D/Gv, Gv]
    parts = []
    for codes, scales in ((kc, ks), (vc, vs)):
        data = _pack_codes(codes.reshape(n, hkv, c, d), fmt.bits).reshape(n, hkv, -1)   # data: [n, Hkv, code_bytes]
        sb = scales.contiguous().view(torch.uint8).reshape(n, hkv, -1)                  # sb: [n, Hkv, <= scale_bytes]
        pad = sb.new_zeros(n, hkv, fmt.scale_bytes - sb.shape[-1])
        parts.append(torch.cat([data, sb, pad], dim=-1))                                # [n, Hkv, part_bytes]
    return torch.stack(parts, dim=1).reshape(n, fmt.chunk_bytes)                        # [n, B]


def dequantize_chunks(packed: torch.Tensor, fmt: PackedFormat, dtype: torch.dtype | None = None) -> torch.Tensor:
    """packed [n, chunk_bytes] uint8 -> [n, 2, Hkv, C, D] in dtype (default: float32 when compressed, else the
    raw dtype, bit-identical)."""
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != fmt.chunk_bytes:
        raise ValueError(f"packed chunks must be [n, {fmt.chunk_bytes}] uint8, got {list(packed.shape)} {packed.dtype}")
    hkv, c, d, ns = fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim, fmt.scales_per_group
    if not fmt.compressed:
        raw = packed.contiguous().view(fmt.raw_dtype).reshape(n, 2, hkv, c, d)
        return raw if dtype is None else raw.to(dtype)
    gk, gv = fmt.key_group, fmt.value_group
    parts = packed.reshape(n, 2, hkv, fmt.part_bytes)
    codes = _unpack_codes(parts[..., :fmt.code_bytes].reshape(n, 2, hkv, c, -1), fmt.bits)  # codes: [n, 2, Hkv, C, D]
    sb = parts[..., fmt.code_bytes:].contiguous()                                       # sb: [n, 2, Hkv, scale_bytes]
    nk, nv = (c // gk) * d * ns * 2, c * (d // gv) * ns * 2
    ks = sb[:, 0, :, :nk].contiguous().view(torch.float16).float().reshape(n, hkv, c // gk, 1, d, ns)
    vs = sb[:, 1, :, :nv].contiguous().view(torch.float16).float().reshape(n, hkv, c, d // gv, 1, ns)
    kq = codes[:, 0].reshape(n, hkv, c // gk, gk, d)                                    # kq: [n, Hkv, C/Gk, Gk, D]
    vq = codes[:, 1].reshape(n, hkv, c, d // gv, gv)                                    # vq: [n, Hkv, C, D/Gv, Gv]
    k = kq * ks[..., 0] + ks[..., 1]
    v = vq * vs[..., 0] + vs[..., 1]
    out = torch.stack([k.reshape(n, hkv, c, d), v.reshape(n, hkv, c, d)], dim=1)        # out: [n, 2, Hkv, C, D]
    return out if dtype is None else out.to(dtype)


# ---- attention and row gathers over packed pools (references; the kernels dispatch from here) -----------
def _dequantized_pool(pool: torch.Tensor, slots: torch.Tensor, fmt: PackedFormat | None,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, slots) with a packed pool replaced by its used slots, dequantized, and slots renumbered."""
    if not is_packed(pool):
        return pool, slots
    if fmt is None:
        raise ValueError("a packed pool needs its PackedFormat (fmt=)")
    flat = slots.to(pool.device).long()                                  # flat: [Hkv, K]
    valid = flat >= 0
    used = torch.unique(flat[valid])                                     # used: [m] sorted
    if used.numel() == 0:                                                # nothing selected: one dummy slot
        used = torch.zeros(1, dtype=torch.long, device=pool.device) if pool.shape[0] else used
    mini = dequantize_chunks(pool[used], fmt, dtype)                     # mini: [m, 2, Hkv, C, D]
    renum = torch.searchsorted(used, flat.clamp(min=0))                  # renum: [Hkv, K]
    return mini, torch.where(valid, renum, -1).to(slots.device)


def _split_alt(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flagged = (slots >= 0) & (slots & ALT_SLOT != 0)                     # flagged: [Hkv, K]
    none = torch.full_like(slots, -1)
    return torch.where(flagged, none, slots), torch.where(flagged, slots & ~ALT_SLOT, none)


def _gpu_path(ref: torch.Tensor, pools) -> object | None:
    """The CuPy launchers when ref is on the GPU and every pool is readable there (a pinned host pool through
    UVA), else None."""
    if not ref.is_cuda or any(p is not None and not (p.is_cuda or p.is_pinned()) for p in pools):
        return None
    from . import _backend
    if _backend() is None:
        return None
    from . import _cupy_quant
    return _cupy_quant


def gather_attend_q(q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, scale: float,
                    fmt: PackedFormat | None = None, alt_pool: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.gather_attend where pool and/or alt_pool may be packed [S, B] uint8 in format `fmt`.

    q [Hq, D]; slots [Hkv, K] (-1 padding, ALT_SLOT = alt_pool) -> (o [Hq, D], lse [Hq]) float32.
    """
    if not (is_packed(pool) or is_packed(alt_pool)):
        from . import gather_attend
        return gather_attend(q, pool, slots, scale, alt_pool)
    gpu = _gpu_path(q, (pool, alt_pool))
    if gpu is not None and gpu.supports_attend_q(q, pool, alt_pool, fmt):
        return gpu.gather_attend_q(q, pool, slots, scale, fmt, alt_pool)
    return reference_gather_attend_q(q, pool, slots, scale, fmt, alt_pool)


def reference_gather_attend_q(q, pool, slots, scale, fmt=None, alt_pool=None):
    """Torch reference: dequantize the used chunks (float32), then reference.gather_attend."""
    if alt_pool is None:
        return reference.gather_attend(q, *_dequantized_pool(pool, slots, fmt), scale)
    own, alt = _split_alt(slots)
    o1 = reference.gather_attend(q, *_dequantized_pool(pool, own, fmt), scale)
    o2 = reference.gather_attend(q, *_dequantized_pool(alt_pool, alt, fmt), scale)
    return reference.merge_attn(*o1, *o2)


def gather_rows_q(pool: torch.Tensor, slots: torch.Tensor, which: int, rows: torch.Tensor | None = None,
                  alt_pool: torch.Tensor | None = None, fmt: PackedFormat | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """kernels.gather_rows where pool and/or alt_pool may be packed -> [Hkv, R, D] in `dtype` (default: the raw
    pool's dtype, float32 when both are packed), on slots' device."""
    if not (is_packed(pool) or is_packed(alt_pool)):
        from . import gather_rows
        return gather_rows(pool, slots, which, rows, alt_pool)
    raw = [p for p in (pool, alt_pool) if p is not None and not is_packed(p)]
    dtype = dtype or (raw[0].dtype if raw else torch.float32)
    gpu = _gpu_path(slots, (pool, alt_pool))
    if gpu is not None and gpu.supports_rows_q(pool, alt_pool, fmt, dtype):
        return gpu.gather_rows_q(pool, slots, which, rows, alt_pool, fmt, dtype)
    return reference_gather_rows_q(pool, slots, which, rows, alt_pool, fmt, dtype)


def reference_gather_rows_q(pool, slots, which, rows=None, alt_pool=None, fmt=None, dtype=torch.float32):
    """Torch reference: dequantize the used chunks of each packed pool (float32, then dtype), then
    reference.gather_rows over the renumbered slots."""
    own, alt = _split_alt(slots) if alt_pool is not None else (slots, None)
    p1, s1 = _dequantized_pool(pool, own, fmt)
    p1 = p1.to(dtype)
    if alt is None:
        return reference.gather_rows(p1, s1, which, rows).to(dtype)
    p2, s2 = _dequantized_pool(alt_pool, alt, fmt)
    merged = torch.where(s2 >= 0, s2 | ALT_SLOT, s1)                     # merged: [Hkv, K]
    return reference.gather_rows(p1, merged, which, rows, p2.to(dtype))
