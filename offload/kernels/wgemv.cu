// Dequantize-GEMV, tuned variant (the runtime picks its knobs per shape: offload/kernels/wgemv_table.py).
// y[r] = sum_k W[r, k] x[k] for one token; W in the planes of a GGUF block format (qformats.py), read once.
//
// A CTA of GV_WARPS warps holds GV_WARPS / GV_KSPLIT row groups; a group is GV_KSPLIT warps that split the row's
// K between them (their sums meet in shared memory) and work on GV_RPW rows at once, so each x value read serves
// GV_RPW rows. A lane walks "units" (32 weights: one Q8_0/Q4_0/Q4_1 block, or 16 quant bytes of a K-quant
// super-block) u = first, first + 32 * GV_KSPLIT, ...: consecutive lanes read consecutive 16-byte vectors, and
// each lane issues the loads of GV_UNROLL units x GV_RPW rows before it uses any (bytes in flight).
// GV_XSMEM = 1: x is converted to float32 once per CTA into shared memory (16-byte chunks XOR-swizzled so a
// warp's vector reads hit distinct banks), with the sum of every 16 values (the Q4_1/Q4_K offset terms); the
// grid may then be smaller than the tile count (the launcher's choice) and each CTA loops over row tiles.
// GV_XSMEM = 0: x is read through L1 in its own dtype and converted per unit.
#include "common.cuh"
#include "wblocks.cuh"

#ifndef GV_WARPS
#define GV_WARPS 8
#endif
#ifndef GV_RPW
#define GV_RPW 2
#endif
#ifndef GV_UNROLL
#define GV_UNROLL 2
#endif
#ifndef GV_KSPLIT
#define GV_KSPLIT 1
#endif
#ifndef GV_XSMEM
#define GV_XSMEM 1
#endif
#ifndef GV_DEC
#define GV_DEC 1       // 4- and 6-bit codes: 1 = mant_dot (2.5 instructions a weight), 0 = byte_f (3.4)
#endif

static constexpr int gv_groups = GV_WARPS / GV_KSPLIT;   // row groups per CTA
static constexpr int gv_tile_rows = gv_groups * GV_RPW;   // rows per tile

// the place of 16-byte chunk c of x in shared memory: the low bits of c XOR the bits that tell apart the 8 lanes
// of one 16-byte-load phase, per format (which x a lane reads depends on the format's nibble order)
template <int FMT> __device__ __forceinline__ int xs_chunk(int c) {
    if (FMT == FMT_Q4_K) return c ^ (((c >> 4) & 1) | ((c >> 5) & 2));   // lanes differ in bits 2, 4, 6
    if (FMT == FMT_Q6_K) return c ^ (((c >> 3) & 1) | ((c >> 4) & 2));
    return c ^ ((c >> 3) & 7);
}

// a unit's codes for one row, loaded before use: a (and b) 16 quant bytes, s/t scale bits
struct Codes {
    uint4 a, b;
    unsigned int s, t;
};

template <int FMT>
__device__ __forceinline__ Codes load_codes(const unsigned char* p0, const unsigned char* p1, const unsigned char* p2,
                                            const unsigned char* p3, long long r, int K, int u) {
    Codes c;
    if (FMT == FMT_Q8_0) {            // p0 qs int8 [R, K], p1 d f16 [R, K/32]
        const uint4* q = (const uint4*)(p0 + r * K + u * 32);
        c.a = __ldg(q);
        c.b = __ldg(q + 1);
        c.s = __ldg((const unsigned short*)(p1 + r * (K / 16)) + u);
    } else if (FMT == FMT_Q4_0) {     // p0 qs [R, K/2], p1 d [R, K/32 * 2]
        c.a = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        c.s = __ldg((const unsigned short*)(p1 + r * (K / 16)) + u);
    } else if (FMT == FMT_Q4_1) {     // p1 dm [R, K/32 * 4]: f16 scale, f16 min
        c.a = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        c.s = __ldg((const unsigned int*)(p1 + r * (K / 8)) + u);
    } else if (FMT == FMT_Q4_K) {     // p1 meta [R, K/256 * 16]: d, dmin, 12 scale bytes (shared by 8 units)
        c.a = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        c.b = __ldg((const uint4*)(p1 + r * (K / 16) + (u >> 3) * 16));
    } else {                          // Q6_K: p0 ql [R, K/2], p1 qh [R, K/4], p2 sc int8 [R, K/16], p3 d [R, K/128]
        const int sb = u >> 3, b = (u & 7) * 16, h = b >> 6, o = b & 63;
        c.a = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        c.b = __ldg((const uint4*)(p1 + r * (K / 4) + sb * 64 + h * 32 + (o & 31)));
        const unsigned char* sc = p2 + r * (K / 16) + sb * 16 + h * 8 + (o >> 4);
        c.s = (unsigned int)__ldg(sc) | ((unsigned int)__ldg(sc + 4) << 8);
        c.t = __ldg((const unsigned short*)(p3 + r * (K / 128)) + sb);
    }
    return c;
}

// where unit u's two runs of 16 x values start (xa: low nibbles / first half, xb: the rest)
template <int FMT> __device__ __forceinline__ int unit_k(int u) {
    if (FMT == FMT_Q4_K) return (u >> 3) * 256 + ((u & 7) >> 1) * 64 + (u & 1) * 16;   // xb: +32
    if (FMT == FMT_Q6_K) return (u >> 3) * 256 + ((u & 7) >> 2) * 128 + (u & 3) * 16;  // xb: +64
    return u * 32;                                                                      // xb: +16
}
template <int FMT> __device__ __forceinline__ int unit_kb(int ka) {
    return ka + (FMT == FMT_Q4_K ? 32 : (FMT == FMT_Q6_K ? 64 : 16));
}

// 16 x values from k (a multiple of 16) as floats, and their sum when the format needs it
template <typename T, int FMT>
__device__ __forceinline__ float x16(const float* xs, const void* x, int K, int k, float* f) {
    constexpr bool need_sum = FMT != FMT_Q8_0 && (FMT == FMT_Q4_1 || FMT == FMT_Q4_K || GV_DEC == 1);
    if (GV_XSMEM) {
        // xs_chunk XORs the low bits with bits >= 3, which (k >> 2) + j (j < 4) share: one XOR for the 4 chunks
        const int c = k >> 2, sw = xs_chunk<FMT>(c) ^ c;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float4 v = ((const float4*)xs)[(c + j) ^ sw];
            f[4 * j] = v.x; f[4 * j + 1] = v.y; f[4 * j + 2] = v.z; f[4 * j + 3] = v.w;
        }
        return need_sum ? xs[K + (k >> 4)] : 0.f;
    }
    load_x16<T>(x, k, f);
    return need_sum ? sum16(f) : 0.f;
}

// The unit a lane's slot s reads. Slots are what lanes walk (lane + 32 * GV_KSPLIT * t: coalesced); for Q4_K a
// run of 64 slots covers 8 super-blocks, first the quant bytes 0..63 of each (sub-blocks 0-3), then 64..127, so
// every warp-wide step decodes its scales one way (k_pair's branch is warp-uniform). Rows whose length is not a
// multiple of 64 units keep the plain order in their tail.
template <int FMT> __device__ __forceinline__ int slot_unit(int s, int units) {
    if (FMT != FMT_Q4_K || s >= (units & ~63)) return s;
    const int w = s & 63, l = w & 31;
    return (s & ~63) + (l >> 2) * 8 + (w >> 5) * 4 + (l & 3);
}

// GV_DEC = 1: a code v (0..15, or 0..63 for Q6_K) becomes the float 1 + v / 16 (1 + v / 64) by one PRMT that
// puts the byte 0x80 | v << 3 (0x80 | v << 1) under the exponent of 1.0; so sum (1 + v/16) x = sum x + sum v x / 16
// needs no int-to-float conversion and no per-weight subtraction (the sum of x comes from the staged sums).
// q: bytes already in that form; returns sum over the 16 bytes of their float times x.
__device__ __forceinline__ float mant_dot(const unsigned int* q, const float* x) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i)
        s += __uint_as_float(__byte_perm(q[i >> 2], 0x3F000000u, 0x7044u | ((unsigned int)(i & 3) << 8))) * x[i];
    return s;
}

// (a & b) | c in one LOP3: written out because the compiler gives LOP3 only one immediate and splits
// `(a & 0x78787878) | 0x80808080` in two; here c comes in a register
__device__ __forceinline__ unsigned int and_or(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// sum over the 16 nibbles (low: shift 0, high: shift 4) of w's bytes of v * x, given sx = the sum of the 16 x
__device__ __forceinline__ float nib_mant(const unsigned int* w, const float* x, int shift, float sx) {
    unsigned int q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
        q[j] = and_or(shift == 0 ? (w[j] << 3) : (w[j] >> 1), 0x78787878u, 0x80808080u);
    return 16.f * (mant_dot(q, x) - sx);
}

// a small unsigned integer as a float without I2F (an eighth-rate instruction): under the exponent of 2^23
__device__ __forceinline__ float small_f(unsigned int v) {
    return __uint_as_float(v | 0x4B000000u) - 8388608.f;
}

// Q4_K: the scales and mins of sub-blocks 2 pair and 2 pair + 1 from the 12 scale bytes in words w0..w2. pair is
// the same for all of a lane's units, so the byte offset and which layout applies are lane constants.
__device__ __forceinline__ void k_pair(unsigned int w0, unsigned int w1, unsigned int w2, int pair,
                                       float& sc0, float& mn0, float& sc1, float& mn1) {
    const int sh = (pair & 1) * 16;                   // bytes 2 pair & 3 and the next one
    const unsigned int a = w0 >> sh, b = w1 >> sh;
    if (pair < 2) {                                   // pairs 0, 1: six bits each in a (scales) and b (mins)
        sc0 = small_f(a & 63u); sc1 = small_f((a >> 8) & 63u);
        mn0 = small_f(b & 63u); mn1 = small_f((b >> 8) & 63u);
    } else {                                          // pairs 2, 3: low 4 bits in w2, high 2 bits atop a and b
        const unsigned int m = w2 >> sh;
        sc0 = small_f((m & 15u) | ((a >> 2) & 48u)); sc1 = small_f(((m >> 8) & 15u) | ((a >> 10) & 48u));
        mn0 = small_f(((m >> 4) & 15u) | ((b >> 2) & 48u)); mn1 = small_f(((m >> 12) & 15u) | ((b >> 10) & 48u));
    }
}

// unit c of one row dotted with its x values (xa, xb: 16 each; sa, sb: their sums where needed)
template <int FMT>
__device__ __forceinline__ float unit_dot2(const Codes& c, const float* xa, const float* xb, float sa, float sb,
                                           int pair) {
    if (FMT == FMT_Q8_0) {            // int8 as b ^ 0x80 (0..255), the 128 removed by byte_f's bias
        const unsigned int ta[4] = {c.a.x ^ 0x80808080u, c.a.y ^ 0x80808080u, c.a.z ^ 0x80808080u, c.a.w ^ 0x80808080u};
        const unsigned int tb[4] = {c.b.x ^ 0x80808080u, c.b.y ^ 0x80808080u, c.b.z ^ 0x80808080u, c.b.w ^ 0x80808080u};
        return ofl_half_bits((unsigned short)c.s) * (byte_dot(ta, xa, 128.f) + byte_dot(tb, xb, 128.f));
    } else if ((FMT == FMT_Q4_0 || FMT == FMT_Q4_1) && GV_DEC == 1) {
        const unsigned int w[4] = {c.a.x, c.a.y, c.a.z, c.a.w};
        const float s = nib_mant(w, xa, 0, sa) + nib_mant(w, xb, 4, sb);   // sum v x over the block
        if (FMT == FMT_Q4_0) return ofl_half_bits((unsigned short)c.s) * (s - 8.f * (sa + sb));
        return ofl_half_bits((unsigned short)(c.s & 0xffffu)) * s + ofl_half_bits((unsigned short)(c.s >> 16)) * (sa + sb);
    } else if (FMT == FMT_Q4_0 || FMT == FMT_Q4_1) {
        const unsigned int w[4] = {c.a.x, c.a.y, c.a.z, c.a.w};
        const unsigned int lo[4] = {w[0] & 0x0F0F0F0Fu, w[1] & 0x0F0F0F0Fu, w[2] & 0x0F0F0F0Fu, w[3] & 0x0F0F0F0Fu};
        const unsigned int hi[4] = {(w[0] >> 4) & 0x0F0F0F0Fu, (w[1] >> 4) & 0x0F0F0F0Fu, (w[2] >> 4) & 0x0F0F0F0Fu,
                                    (w[3] >> 4) & 0x0F0F0F0Fu};
        if (FMT == FMT_Q4_0)          // the -8 offset folded into byte_f's bias: no sums of x needed
            return ofl_half_bits((unsigned short)c.s) * (byte_dot(lo, xa, 8.f) + byte_dot(hi, xb, 8.f));
        return ofl_half_bits((unsigned short)(c.s & 0xffffu)) * (byte_dot(lo, xa, 0.f) + byte_dot(hi, xb, 0.f)) +
               ofl_half_bits((unsigned short)(c.s >> 16)) * (sa + sb);
    } else if (FMT == FMT_Q4_K) {     // pair: this lane's sub-block pair (2 pair, 2 pair + 1), the same for all its units
        const unsigned int w[4] = {c.a.x, c.a.y, c.a.z, c.a.w};
        float sc0, mn0, sc1, mn1;
        k_pair(c.b.y, c.b.z, c.b.w, pair, sc0, mn0, sc1, mn1);
        const float d = ofl_half_bits((unsigned short)(c.b.x & 0xffffu));
        const float dmin = ofl_half_bits((unsigned short)(c.b.x >> 16));
        if (GV_DEC == 1)
            return d * (sc0 * nib_mant(w, xa, 0, sa) + sc1 * nib_mant(w, xb, 4, sb)) - dmin * (mn0 * sa + mn1 * sb);
        return d * (sc0 * nib_dot(w, xa, 0) + sc1 * nib_dot(w, xb, 4)) - dmin * (mn0 * sa + mn1 * sb);
    } else {                          // Q6_K: 6-bit weights biased by 32 (byte_f removes it), int8 scales per 16
        const int o = (pair & 3) * 16;   // here `pair` is u & 7 (lane-constant): o is the byte offset in a 64-run
        const int sl = 2 * (o >> 5), sh = sl + 4;
        const unsigned int wl[4] = {c.a.x, c.a.y, c.a.z, c.a.w}, wh[4] = {c.b.x, c.b.y, c.b.z, c.b.w};
        unsigned int q0[4], q1[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            q0[j] = (wl[j] & 0x0F0F0F0Fu) | (((wh[j] >> sl) & 0x03030303u) << 4);
            q1[j] = ((wl[j] >> 4) & 0x0F0F0F0Fu) | (((wh[j] >> sh) & 0x03030303u) << 4);
        }
        const float s0 = small_f((c.s & 0xffu) ^ 0x80u) - 128.f, s1 = small_f((c.s >> 8) ^ 0x80u) - 128.f;   // int8
        if (GV_DEC == 1) {            // v (0..63) as 1 + v/64: sum (v - 32) x = 64 (mant_dot - sx) - 32 sx
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                q0[j] = and_or(q0[j] << 1, 0xFFFFFFFFu, 0x80808080u);
                q1[j] = and_or(q1[j] << 1, 0xFFFFFFFFu, 0x80808080u);
            }
            return ofl_half_bits((unsigned short)c.t) *
                   (s0 * (64.f * mant_dot(q0, xa) - 96.f * sa) + s1 * (64.f * mant_dot(q1, xb) - 96.f * sb));
        }
        return ofl_half_bits((unsigned short)c.t) * (s0 * byte_dot(q0, xa, 32.f) + s1 * byte_dot(q1, xb, 32.f));
    }
}

// the codes of units ub, ub + step, ... (GV_UNROLL of them) of rows r0 .. r0 + GV_RPW - 1, all requested before
// any is used; units past the row's end and rows past R read valid neighbours (their sums are skipped)
template <int FMT>
__device__ __forceinline__ void load_batch(Codes (&c)[GV_UNROLL][GV_RPW], const unsigned char* p0,
                                           const unsigned char* p1, const unsigned char* p2, const unsigned char* p3,
                                           int r0, int R, int K, int ub, int units) {
#pragma unroll
    for (int i = 0; i < GV_UNROLL; ++i) {
        const int u = slot_unit<FMT>(min(ub + i * 32 * GV_KSPLIT, units - 1), units);
#pragma unroll
        for (int j = 0; j < GV_RPW; ++j) c[i][j] = load_codes<FMT>(p0, p1, p2, p3, min(r0 + j, R - 1), K, u);
    }
}

// y[r] for rows r < R. tiles = ceil(R / gv_tile_rows); the grid may be smaller (each CTA loops over tiles).
// Dynamic shared memory: GV_XSMEM ? (K + K/16) floats : 0, then GV_WARPS * GV_RPW floats (the K-split sums).
template <typename T, int FMT>
__global__ void __launch_bounds__(32 * GV_WARPS) gemv2_kernel(
        const unsigned char* __restrict__ p0, const unsigned char* __restrict__ p1,
        const unsigned char* __restrict__ p2, const unsigned char* __restrict__ p3,
        const void* __restrict__ x, void* __restrict__ y, int R, int K, int tiles) {
    extern __shared__ float4 gv_smem4[];
    float* xs = (float*)gv_smem4;                        // xs: [K] swizzled, then [K/16] sums of 16
    float* red = xs + (GV_XSMEM ? K + K / 16 : 0);       // red: [GV_WARPS][GV_RPW]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = warp / GV_KSPLIT, ks = warp - grp * GV_KSPLIT;
    const int units = K >> 5, step = 32 * GV_KSPLIT;
    Codes c[GV_UNROLL][GV_RPW];
    bool loaded = false;
    if (GV_XSMEM) {
        // the first tile's first codes are requested before x is staged: their latency overlaps the staging
        load_batch<FMT>(c, p0, p1, p2, p3, (blockIdx.x * gv_groups + grp) * GV_RPW, R, K, ks * 32 + lane, units);
        loaded = true;
        for (int g = threadIdx.x; g < K / 16; g += blockDim.x) {
            float f[16];
            load_x16<T>(x, (long long)g * 16, f);
            xs[K + g] = sum16(f);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                gv_smem4[xs_chunk<FMT>(4 * g + j)] = make_float4(f[4 * j], f[4 * j + 1], f[4 * j + 2], f[4 * j + 3]);
        }
        __syncthreads();
    }
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int r0 = (tile * gv_groups + grp) * GV_RPW;
        float acc[GV_RPW];
#pragma unroll
        for (int j = 0; j < GV_RPW; ++j) acc[j] = 0.f;
        for (int ub = ks * 32 + lane; ub < units; ub += step * GV_UNROLL) {
            if (!loaded) load_batch<FMT>(c, p0, p1, p2, p3, r0, R, K, ub, units);
            loaded = false;
#pragma unroll
            for (int i = 0; i < GV_UNROLL; ++i) {
                if (ub + i * step < units) {
                    const int u = slot_unit<FMT>(ub + i * step, units);
                    const int pair = FMT == FMT_Q4_K ? (u & 7) >> 1 : (u & 7);   // Q4_K's sub-block pair, Q6_K's run
                    float xa[16], xb[16];
                    const int ka = unit_k<FMT>(u);
                    const float sa = x16<T, FMT>(xs, x, K, ka, xa);
                    const float sb = x16<T, FMT>(xs, x, K, unit_kb<FMT>(ka), xb);
#pragma unroll
                    for (int j = 0; j < GV_RPW; ++j) acc[j] += unit_dot2<FMT>(c[i][j], xa, xb, sa, sb, pair);
                }
            }
        }
        loaded = false;               // (a lane with no unit in this tile never used the early batch)
#pragma unroll
        for (int j = 0; j < GV_RPW; ++j) {
#pragma unroll
            for (int m = 16; m > 0; m >>= 1) acc[j] += ofl_shfl_xor(acc[j], m);
        }
        if (GV_KSPLIT == 1) {
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < GV_RPW; ++j)
                    if (r0 + j < R) store1<T>(y, r0 + j, acc[j]);
            }
        } else {                      // the group's warps add their parts of K (the loop bounds are CTA-uniform)
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < GV_RPW; ++j) red[warp * GV_RPW + j] = acc[j];
            }
            __syncthreads();
            if (threadIdx.x < gv_tile_rows) {
                const int g = threadIdx.x / GV_RPW, j = threadIdx.x - g * GV_RPW;
                float s = 0.f;
#pragma unroll
                for (int k = 0; k < GV_KSPLIT; ++k) s += red[(g * GV_KSPLIT + k) * GV_RPW + j];
                const int r = (tile * gv_groups + g) * GV_RPW + j;
                if (r < R) store1<T>(y, r, s);
            }
            __syncthreads();
        }
    }
}
