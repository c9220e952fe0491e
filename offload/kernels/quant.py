"""Compressed KV chunks for the host and disk tiers (`kv_dtype` int8 / int4), with torch references.

A chunk [2, Hkv, C, D] packs into a fixed number of bytes, so a pool of packed chunks is a [S, B] uint8
tensor that tiers store, copy and CRC like any other. Layout of one packed chunk:

    [Hkv K parts | Hkv V parts]   part = one KV head's K or V: codes [C, D*bits/8], then its scales
    codes:   int8 one byte per element; int4 two per byte along D (element 2i in the low nibble)
    int8 (layout 2), x = code * step + min:
      K part:  codes | min [C/Gk, D] fp16 | step [C/Gk, D] u8     keys per channel over Gk = 32 tokens
      V part:  codes | (step, min) [C] fp16 pairs                 values per token over the whole head (Gv = D)
      u8 step = the top byte of the fp16 step rounded up (5 exponent, 3 mantissa bits): fp16 bits = u8 << 7
    int4 (layout 1, unchanged), x = code * scale + min, both parts padded to the larger of:
      K part:  codes | (scale, min) [C/Gk, D] fp16 pairs           keys per channel over Gk = 32 tokens
      V part:  codes | (scale, min) [C, D/Gv] fp16 pairs           values per token over Gv = 32 channels
Keys per channel and values per token is KIVI's / KVQuant's finding: key outliers sit in fixed channels,
value errors must stay local to a token. Gk = min(32, C). With C = 32, D = 128 a chunk is 0.53125x its bf16
size in int8 (was 0.5625x in layout 1) and 0.3125x in int4. Format choice (bench/kv_format_error.py: SmolLM2's
real KV, 4K tokens, attention output error relative to exact, mean over layers; numbers in bench/RESULTS.md):
asymmetric (scale and min) keys are needed, symmetric int8 has 2.4x the error (keys carry per-channel offsets);
int8 values per token over the whole head instead of 32 channels cost +10 % error, the 8-bit key step +17 %
more, an integer zero point instead of the fp16 min +40 %. Each part starts 32-byte aligned (128 at D = 128),
so a UVA read of the host slab moves whole sectors. LAYOUTS records each compressed dtype's layout version:
prompt caches and saved sessions carry it, so a file of another layout is never read as this one.

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

__all__ = ["KV_DTYPES", "LAYOUTS", "PackedFormat", "PackedStorage", "packed_format", "quantize_chunks", "dequantize_chunks", "is_packed",
           "gather_attend_q", "gather_rows_q"]

KV_DTYPES = ("bf16", "int8", "int4")
_GROUP = 32            # Gk (tokens per key scale), and int4's Gv (channels per value scale), capped by C and D
LAYOUTS = {"int8": 2, "int4": 1}   # bump when a packed layout changes (prompt caches and saved sessions record it)
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
    def layout(self) -> str:
        """What identifies the packed bytes: "bf16" (raw), else e.g. "int8.v2"."""
        return f"{self.kv_dtype}.v{LAYOUTS[self.kv_dtype]}" if self.compressed else "bf16"

    @property
    def key_group(self) -> int:
        return min(_GROUP, self.chunk_tokens)

    @property
    def value_group(self) -> int:
        return self.head_dim if self.bits == 8 else min(_GROUP, self.head_dim)

    @property
    def code_bytes(self) -> int:
        """Codes of one part: [C, D*bits/8]."""
        return self.chunk_tokens * self.head_dim * self.bits // 8

    @property
    def key_scale_bytes(self) -> int:
        """int8: fp16 min + u8 step per (key group, channel); int4: an fp16 (scale, min) pair."""
        return (self.chunk_tokens // self.key_group) * self.head_dim * (3 if self.bits == 8 else 4)

    @property
    def value_scale_bytes(self) -> int:
        return self.chunk_tokens * (self.head_dim // self.value_group) * 4

    def _part(self, scale_bytes: int) -> int:
        if not self.compressed:
            return self.chunk_tokens * self.head_dim * self.bits // 8
        if self.bits == 4:   # layout 1: both parts padded to the larger scales, to 16 bytes
            return self.code_bytes + -(-max(self.key_scale_bytes, self.value_scale_bytes) // 16) * 16
        return self.code_bytes + -(-scale_bytes // 32) * 32

    @property
    def key_part_bytes(self) -> int:
        return self._part(self.key_scale_bytes)

    @property
    def value_part_bytes(self) -> int:
        return self._part(self.value_scale_bytes)

    def part_offset(self, which: int, head: int) -> int:
        """Byte offset in a chunk of head `head`'s K (which=0) or V (which=1) part."""
        k, v = self.key_part_bytes, self.value_part_bytes
        return head * k if which == 0 else self.num_kv_heads * k + head * v

    @property
    def chunk_bytes(self) -> int:
        return self.num_kv_heads * (self.key_part_bytes + self.value_part_bytes)

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
def _step8(step16: torch.Tensor) -> torch.Tensor:
    """fp16 steps (>= 0) rounded up to 8 bits: their top byte after dropping the sign (5 exponent, 3 mantissa)."""
    b = step16.view(torch.int16).int()                                     # b: [...] fp16 bits, < 0x7C00
    return ((b + 0x7F) >> 7).to(torch.uint8)                               # [...] u8: fp16 bits = u8 << 7


def _unstep8(u8: torch.Tensor) -> torch.Tensor:
    """u8 steps -> float32 (exact)."""
    return (u8.to(torch.int16) << 7).view(torch.float16).float()


def _quantize(x: torch.Tensor, dim: int, fmt: PackedFormat, step8: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, x's shape) and the fp16 min and step (x's shape without `dim`) over groups along dim; with
    step8 the step is rounded up to 8 bits (returned as u8)."""
    x = x.clamp(-_F16_MAX, _F16_MAX)
    levels = (1 << fmt.bits) - 1
    lo16 = x.amin(dim).half()                                              # lo16: [...] fp16
    lo = lo16.float().unsqueeze(dim)
    # the step is computed from the rounded min (and rounded up when 8-bit), so codes span [0, levels]
    step16 = ((x.amax(dim, keepdim=True) - lo) / levels).clamp(min=0).squeeze(dim).half()   # step16: [...] fp16
    if step8:
        step16 = _step8(step16)
        step = _unstep8(step16).unsqueeze(dim)
    else:
        step = step16.float().unsqueeze(dim)
    codes = torch.round((x - lo) / torch.where(step > 0, step, 1.0)).clamp(0, levels)
    return codes.to(torch.uint8), lo16, step16


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


def _bytes(t: torch.Tensor, n: int, hkv: int) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(n, hkv, -1)            # [n, Hkv, bytes]


def _part(codes: torch.Tensor, scales: list[torch.Tensor], part_bytes: int, fmt: PackedFormat) -> torch.Tensor:
    """One part of every head: codes [n, Hkv, C, D] and its scale tensors (bytes in order) -> [n, Hkv, part_bytes]."""
    n, hkv = codes.shape[:2]
    data = [_pack_codes(codes, fmt.bits).reshape(n, hkv, -1)] + [_bytes(t, n, hkv) for t in scales]
    used = sum(t.shape[-1] for t in data)
    return torch.cat(data + [data[0].new_zeros(n, hkv, part_bytes - used)], dim=-1)


def quantize_chunks(kv: torch.Tensor, fmt: PackedFormat) -> torch.Tensor:
    """kv [n, 2, Hkv, C, D] -> packed [n, chunk_bytes] uint8 on kv's device (raw bytes for bf16)."""
    n, two, hkv, c, d = kv.shape
    if (two, hkv, c, d) != (2, fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim):
        raise ValueError(f"kv {list(kv.shape)} does not match the format's [n, 2, {fmt.num_kv_heads}, "
                         f"{fmt.chunk_tokens}, {fmt.head_dim}]")
    if not fmt.compressed:
        return kv.to(fmt.raw_dtype).contiguous().view(torch.uint8).reshape(n, fmt.chunk_bytes)  # [n, B]
    gk, gv, int8 = fmt.key_group, fmt.value_group, fmt.bits == 8
    x = kv.float()                                                         # x: [n, 2, Hkv, C, D]
    kc, kmin, kstep = _quantize(x[:, 0].reshape(n, hkv, c // gk, gk, d), 3, fmt, step8=int8)  # [n, Hkv, C/Gk, Gk, D]
    vc, vmin, vstep = _quantize(x[:, 1].reshape(n, hkv, c, d // gv, gv), 4, fmt)             # vc: [n, Hkv, C, D/Gv, Gv]
    # int8 K scales: min [C/Gk, D] fp16 then step [C/Gk, D] u8; otherwise (step, min) fp16 pairs
    kscales = [kmin, kstep] if int8 else [torch.stack([kstep, kmin], dim=-1)]
    k = _part(kc.reshape(n, hkv, c, d), kscales, fmt.key_part_bytes, fmt)                    # k: [n, Hkv, Kpart]
    v = _part(vc.reshape(n, hkv, c, d), [torch.stack([vstep, vmin], dim=-1)], fmt.value_part_bytes, fmt)
    return torch.cat([k.reshape(n, -1), v.reshape(n, -1)], dim=1)                             # [n, B]


def dequantize_chunks(packed: torch.Tensor, fmt: PackedFormat, dtype: torch.dtype | None = None) -> torch.Tensor:
    """packed [n, chunk_bytes] uint8 -> [n, 2, Hkv, C, D] in dtype (default: float32 when compressed, else the
    raw dtype, bit-identical)."""
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != fmt.chunk_bytes:
        raise ValueError(f"packed chunks must be [n, {fmt.chunk_bytes}] uint8, got {list(packed.shape)} {packed.dtype}")
    hkv, c, d = fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim
    if not fmt.compressed:
        raw = packed.contiguous().view(fmt.raw_dtype).reshape(n, 2, hkv, c, d)
        return raw if dtype is None else raw.to(dtype)
    gk, gv, cb = fmt.key_group, fmt.value_group, fmt.code_bytes
    kparts = packed[:, :hkv * fmt.key_part_bytes].reshape(n, hkv, fmt.key_part_bytes)      # [n, Hkv, Kpart]
    vparts = packed[:, hkv * fmt.key_part_bytes:].reshape(n, hkv, fmt.value_part_bytes)    # [n, Hkv, Vpart]

    def fp16(b: torch.Tensor, shape) -> torch.Tensor:
        return b.contiguous().view(torch.float16).float().reshape(shape)

    ng = c // gk
    if fmt.bits == 8:
        kmin = fp16(kparts[..., cb:cb + ng * d * 2], (n, hkv, ng, 1, d))                     # [n, Hkv, C/Gk, 1, D]
        kstep = _unstep8(kparts[..., cb + ng * d * 2:cb + ng * d * 3]).reshape(n, hkv, ng, 1, d)
    else:
        ks = fp16(kparts[..., cb:cb + ng * d * 4], (n, hkv, ng, 1, d, 2))                    # ks: [..., (step, min)]
        kstep, kmin = ks[..., 0], ks[..., 1]
    vs = fp16(vparts[..., cb:cb + c * (d // gv) * 4], (n, hkv, c, d // gv, 1, 2))           # [n, Hkv, C, D/Gv, 1, 2]
    kq = _unpack_codes(kparts[..., :cb].reshape(n, hkv, c, -1), fmt.bits).reshape(n, hkv, ng, gk, d)
    vq = _unpack_codes(vparts[..., :cb].reshape(n, hkv, c, -1), fmt.bits).reshape(n, hkv, c, d // gv, gv)
    k = kq * kstep + kmin                                                                   # k: [n, Hkv, C/Gk, Gk, D]
    v = vq * vs[..., 0] + vs[..., 1]                                                        # v: [n, Hkv, C, D/Gv, Gv]
    out = torch.stack([k.reshape(n, hkv, c, d), v.reshape(n, hkv, c, d)], dim=1)          # out: [n, 2, Hkv, C, D]
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
