"""Which dequantize-GEMV variant runs for a weight part: the tuning knobs, the candidates, and the table.

A `Variant` is one set of wgemv.cu's compile-time knobs plus the launcher's grid policy, "tc" (wgemv_tc.cu's
tensor-core kernel: 4-bit formats, bf16 activations; elsewhere `fallback` names the wgemv.cu variant that runs),
or "v1" (wquant.cu's first kernel). `bench/gemv_tune.py` checks every candidate against the torch reference and times it on the
model's layer shapes; its JSON holds the fastest per (format, shape class), and `--write-table` renders this
file's TABLE from it. The runtime calls `pick(fmt, rows, cols)`; no CuPy is needed to read this module.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """wgemv.cu's knobs (see its header); ctas_per_sm = 0: one CTA per row tile, n: a grid of at most n CTAs per
    SM, each looping over tiles (x staged once per CTA). kernel "v1": wquant.cu's gemv_kernel, rpw = WQ_RPW.
    kernel "tc": wgemv_tc.cu's TC_WARPS, TC_KSPLIT (warps, ksplit), TC_MT (mt), TC_SUB (sub), TC_PIPE (pipe)."""
    kernel: str = "v2"
    warps: int = 8
    rpw: int = 2
    unroll: int = 2
    ksplit: int = 1
    xsmem: int = 1
    dec: int = 1
    ctas_per_sm: int = 0
    mt: int = 1
    sub: int = 1
    pipe: int = 0

    @property
    def name(self) -> str:
        if self.kernel == "v1":
            return f"v1r{self.rpw}u{self.unroll}"
        grid = f"p{self.ctas_per_sm}" if self.ctas_per_sm else ""
        if self.kernel == "tc":
            return f"t{self.warps}m{self.mt}k{self.ksplit}{'x' if self.sub else 'o'}{'d' if self.pipe else ''}{grid}"
        return (f"w{self.warps}r{self.rpw}u{self.unroll}k{self.ksplit}{'s' if self.xsmem else 'g'}"
                f"{'m' if self.dec else 'b'}{grid}")

    @property
    def defines(self) -> tuple[str, ...]:
        if self.kernel == "v1":
            return (f"-DWQ_RPW={self.rpw}", f"-DWQ_UNROLL={self.unroll}")
        if self.kernel == "tc":
            return (f"-DTC_WARPS={self.warps}", f"-DTC_MT={self.mt}", f"-DTC_KSPLIT={self.ksplit}",
                    f"-DTC_SUB={self.sub}", f"-DTC_PIPE={self.pipe}")
        return (f"-DGV_WARPS={self.warps}", f"-DGV_RPW={self.rpw}", f"-DGV_UNROLL={self.unroll}",
                f"-DGV_KSPLIT={self.ksplit}", f"-DGV_XSMEM={self.xsmem}", f"-DGV_DEC={self.dec}")

    @property
    def tile_rows(self) -> int:
        if self.kernel == "tc":
            return self.warps // self.ksplit * self.mt * 16
        return self.warps // self.ksplit * self.rpw if self.kernel == "v2" else 4 * self.rpw


def parse(name: str) -> Variant:
    """The variant a name stands for (the inverse of Variant.name), e.g. 'w8r2u4k1sm' or 'w8r2u4k1smp2'."""
    m = re.fullmatch(r"v1r(\d+)u(\d+)", name)
    if m:
        return Variant("v1", 4, int(m[1]), int(m[2]))
    m = re.fullmatch(r"t(\d+)m(\d+)k(\d+)([xo])(d?)(?:p(\d+))?", name)
    if m:
        v = Variant("tc", int(m[1]), ksplit=int(m[3]), xsmem=0, ctas_per_sm=int(m[6] or 0), mt=int(m[2]),
                    sub=int(m[4] == "x"), pipe=int(m[5] == "d"))
        if v.warps % v.ksplit or v.warps * 32 > 1024 or v.mt < 1:
            raise ValueError(f"GEMV variant {name!r}: ksplit must divide warps, and warps <= 32")
        return v
    m = re.fullmatch(r"w(\d+)r(\d+)u(\d+)k(\d+)([sg])([mb])(?:p(\d+))?", name)
    if not m:
        raise ValueError(f"no GEMV variant {name!r}; names look like w8r2u4k1sm or w8r2u4k1smp2 or t8m1k4x or v1r2u2")
    v = Variant("v2", int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5] == "s"), int(m[6] == "m"),
                int(m[7] or 0))
    if v.warps % v.ksplit or v.warps * 32 > 1024:
        raise ValueError(f"GEMV variant {name!r}: ksplit must divide warps, and warps <= 32")
    return v


# What the tune bench tries (bench/gemv_tune.py --variants all). v1r2u2 is the kernel before this table existed.
CANDIDATES = tuple(parse(n) for n in (
    "v1r2u2",
    "w4r1u4k1sm", "w4r2u4k1sm", "w8r2u2k1sm", "w8r2u4k1sm", "w8r4u2k1sm", "w16r2u2k1sm",
    "w8r2u4k1smp2", "w8r2u4k1smp3", "w8r2u4k1smp4", "w8r4u2k1smp2", "w16r2u2k1smp1",
    "w8r2u2k2sm", "w8r2u2k4sm", "w8r2u2k2smp4", "w8r2u4k2sm", "w8r1u8k1sm",
    "w8r2u4k1sb", "w4r2u2k1gm",
    # tensor-core kernel (wgemv_tc.cu): the 4-bit formats with bf16 x; elsewhere the fallback runs
    "t4m1k1x", "t8m1k1x", "t8m1k2x", "t8m1k4x", "t8m1k8x", "t16m1k8x", "t16m1k16x", "t8m2k2x", "t8m2k4x",
    "t8m2k8x", "t8m1k2xd", "t8m1k4xd", "t8m1k8xd", "t8m1k4o", "t8m1k1xp4", "t8m1k2xp2", "t4m1k4x", "t16m1k4x",
    "t16m2k8x", "t8m1k1xd",
))

# the 4-bit formats wgemv_tc.cu reads (it needs bf16 x and rows of whole 64-weight units)
TC_FORMATS = ("Q4_K", "Q4_0", "Q4_1")


def tc_applies(fmt: str, cols: int, bf16_x: bool) -> bool:
    return bf16_x and fmt in TC_FORMATS and cols % 64 == 0


# Shape classes: what the best launch shape depends on (rows to spread over the SMs, K per row).
def shape_class(rows: int, cols: int) -> str:
    if cols >= 8192:
        return "long_k"        # down_proj: 4096 x 14336
    if rows <= 2048:
        return "few_rows"      # k or v alone, small models
    if rows >= 65536:
        return "many_rows"     # lm_head (vocabulary)
    if rows >= 12288:
        return "wide"          # gate|up fused (28672), gate or up alone (14336)
    return "square"            # q|k|v fused (6144), o_proj (4096)


CLASSES = ("few_rows", "square", "wide", "many_rows", "long_k")

# TABLE[format][class] = variant name.
# --- TABLE (bench/gemv_tune.py --write-table rewrites this block) ---
# The fastest per class in bench/gemv_tune.py on NVIDIA H200, 2026-11-30.
TABLE: dict[str, dict[str, str]] = {
    "Q4_0": {"few_rows": "w8r2u2k2smp4", "square": "t8m1k8x", "wide": "t4m1k4x",
             "many_rows": "t4m1k4x", "long_k": "t8m1k8xd"},
    "Q4_1": {"few_rows": "w8r2u2k2smp4", "square": "t8m1k8x", "wide": "w8r4u2k1sm",
             "many_rows": "t4m1k4x", "long_k": "t8m1k8xd"},
    "Q4_K": {"few_rows": "w8r2u2k2sm", "square": "t8m1k8x", "wide": "t8m1k8x",
             "many_rows": "t8m2k2x", "long_k": "t8m1k8xd"},
    "Q6_K": {"few_rows": "w8r2u2k2sm", "square": "w8r2u2k1sm", "wide": "w4r2u2k1gm",
             "many_rows": "w4r2u2k1gm", "long_k": "w4r2u2k1gm"},
    "Q8_0": {"few_rows": "w8r2u2k2smp4", "square": "w4r2u2k1gm", "wide": "w8r2u4k1sb",
             "many_rows": "w8r4u2k1sm", "long_k": "w4r2u2k1gm"},
}
# --- end TABLE ---


# wgemv.cu's fastest per class (bench/gemv_tune.py on the H200, 2026-11-30 01:47 UTC): what runs where the table
# names a "tc" variant that does not apply (float16 / float32 x)
V2_TABLE: dict[str, dict[str, str]] = {
    "Q4_0": {"few_rows": "w8r2u2k2smp4", "square": "w8r2u2k1sm", "wide": "w8r4u2k1sm",
             "many_rows": "w8r4u2k1smp2", "long_k": "w8r2u2k1sm"},
    "Q4_1": {"few_rows": "w8r2u2k2smp4", "square": "w4r2u2k1gm", "wide": "w4r2u4k1sm",
             "many_rows": "w8r4u2k1sm", "long_k": "w16r2u2k1sm"},
    "Q4_K": {"few_rows": "w8r2u2k2sm", "square": "w4r2u2k1gm", "wide": "w4r2u2k1gm",
             "many_rows": "w8r4u2k1smp2", "long_k": "w16r2u2k1smp1"},
}


def pick(fmt: str, rows: int, cols: int) -> Variant:
    """The variant for a part of `rows` x `cols` weights in `fmt` (eager decode asks for each matrix each step)."""
    return _parsed(TABLE[fmt][shape_class(rows, cols)])


def fallback(fmt: str, rows: int, cols: int) -> Variant:
    """The wgemv.cu variant for a part where a "tc" pick does not apply."""
    return _parsed(V2_TABLE.get(fmt, {}).get(shape_class(rows, cols), "w8r2u2k1sm"))


@functools.cache
def _parsed(name: str) -> Variant:
    return parse(name)
