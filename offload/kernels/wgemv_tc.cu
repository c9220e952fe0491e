// Dequantize-GEMV on the tensor cores for the 4-bit formats (Q4_K, Q4_0, Q4_1) and bf16 activations
// (the runtime picks it per shape: offload/kernels/wgemv_table.py; wgemv.cu serves the other cases).
//
// Why: wgemv.cu spends ~2 integer-pipe instructions per weight (unpack, byte -> float) plus an FFMA, which caps
// a 4-bit GEMV near half the HBM rate. Here a nibble becomes an exact bf16 with no conversion: one PRMT puts two
// nibbles under the exponent byte 0x43 (bf16 128 + n), one bf16x2 FMA removes the 128 (or 136: Q4_0's -8), and
// mma.m16n8k16 multiplies 256 weights by x per warp instruction with float32 accumulation. Products of a 4-bit
// integer and a bf16 value are exact in float32, so the result differs from the float32 reference only by the
// order of the float32 additions (as wgemv.cu's does).
//
// The mma as a per-lane dot-product engine. Lane (g, t) (g = lane / 4, t = lane % 4) holds A's rows g and g + 8
// at the k of "thread t"; B's column c comes from lanes (c, t'). Only lanes with g / 2 == t load x (their
// thread's x), all others hold zeros, so column 2t sums over thread t's k only: D[g][2t], which lane (g, t) itself
// receives, is the dot product of the lane's own codes with the x of its own unit. So each lane walks its own
// "units" (32 quant bytes of one row = 64 weights: a Q4_K run of two 32-weight sub-blocks, or two Q4_0/Q4_1
// blocks), with the unit's two scales applied after the mma; lanes t = 0..3 of a row read 128 consecutive bytes.
// Lane (2t + 1, t) holds the unit's x halves swapped: with A = ones its column 2t + 1 gives the second half's sum
// while column 2t gives the first's (the min / offset terms of Q4_K and Q4_1); in the weight mma that column is
// not read.
//
// A CTA of TC_WARPS warps holds TC_WARPS / TC_KSPLIT row groups of TC_MT 16-row tiles; a group's TC_KSPLIT
// warps split K (units 4c + t for c = ks, ks + TC_KSPLIT, ...) and add their sums in shared memory.
#include "common.cuh"
#include "wblocks.cuh"

#ifndef TC_WARPS
#define TC_WARPS 8
#endif
#ifndef TC_MT
#define TC_MT 1        // 16-row tiles per warp (they share the x fragments and the x sums)
#endif
#ifndef TC_KSPLIT
#define TC_KSPLIT 4
#endif
#ifndef TC_SUB
#define TC_SUB 1       // 1: remove the 128 offset from each bf16 pair (exact); 0: subtract 128 * sum(x) after the mma
#endif
#ifndef TC_PIPE
#define TC_PIPE 0      // 1: load the next unit's codes before computing this one (two sets of registers)
#endif

static constexpr int tc_groups = TC_WARPS / TC_KSPLIT;
static constexpr int tc_tile_rows = tc_groups * TC_MT * 16;
static constexpr unsigned TC_ONES = 0x3F803F80u;   // bf16x2 (1, 1)

__device__ __forceinline__ void tc_mma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned tc_fma2(unsigned a, unsigned b, unsigned c) {   // bf16x2 a * b + c
    unsigned d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// the 8 nibbles of word w as bf16x2 pairs: o[0] = low nibbles of bytes 0, 1; o[1] = bytes 2, 3; o[2], o[3] the
// high nibbles. Each is 128 + n exactly; with TC_SUB the format's offset is removed (n, or n - 8 for Q4_0).
template <int FMT> __device__ __forceinline__ void tc_nibbles(unsigned w, unsigned (&o)[4]) {
    const unsigned lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
    o[0] = __byte_perm(lo, 0x43434343u, 0x4140);
    o[1] = __byte_perm(lo, 0x43434343u, 0x4342);
    o[2] = __byte_perm(hi, 0x43434343u, 0x4140);
    o[3] = __byte_perm(hi, 0x43434343u, 0x4342);
    if (TC_SUB) {
        const unsigned neg = FMT == FMT_Q4_0 ? 0xC308C308u : 0xC300C300u;   // -136 or -128 in both halves
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = tc_fma2(o[j], TC_ONES, neg);
    }
}

// word i (0..7) of 32 bytes held in two vectors (i is a constant after unrolling: no local memory)
__device__ __forceinline__ unsigned tc_word(const uint4 (&q)[2], int i) {
    const uint4 v = q[i >> 2];
    return (i & 3) == 0 ? v.x : (i & 3) == 1 ? v.y : (i & 3) == 2 ? v.z : v.w;
}

// where word i's low / high nibbles sit among the unit's 64 x values, as an index into X (bf16 pairs), and which
// of the unit's two scales they take (Q4_K: the low nibbles are sub-block 2j, the high 2j + 1; Q4_0/Q4_1: bytes
// 0..15 are the first block, low nibbles its first 16 weights)
template <int FMT> __device__ __forceinline__ int tc_xw(int i, int hi) {
    if (FMT == FMT_Q4_K) return 2 * i + 16 * hi;
    return 2 * i + (i < 4 ? 8 * hi : 8 + 8 * hi);
}
template <int FMT> __device__ __forceinline__ int tc_half(int i, int hi) { return FMT == FMT_Q4_K ? hi : i >= 4; }

// a unit's codes for the lane's rows: q[m][h] = 32 quant bytes of row 16 m + 8 h + g; s[m][h] = its scale fields
struct TcCodes {
    uint4 q[TC_MT][2][2];
    uint4 s[TC_MT][2];
};

template <int FMT>
__device__ __forceinline__ void tc_load(TcCodes& c, const unsigned char* p0, const unsigned char* p1, int r0, int g,
                                        int R, int K, int u) {
#pragma unroll
    for (int m = 0; m < TC_MT; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long r = min(r0 + 16 * m + 8 * h + g, R - 1);
            const uint4* q = (const uint4*)(p0 + r * (K / 2) + 32 * u);
            c.q[m][h][0] = __ldg(q);
            c.q[m][h][1] = __ldg(q + 1);
            if (FMT == FMT_Q4_K) {          // meta [R, K/256 * 16]: d, dmin, 12 bytes of 6-bit scales and mins
                c.s[m][h] = __ldg((const uint4*)(p1 + r * (K / 16) + 16 * (u >> 2)));
            } else if (FMT == FMT_Q4_0) {   // d [R, K/32 * 2]: the unit's two f16 scales
                c.s[m][h].x = __ldg((const unsigned*)(p1 + r * (K / 16) + 4 * u));
            } else {                        // Q4_1 dm [R, K/32 * 4]: (scale, min) of each block
                const uint2 v = __ldg((const uint2*)(p1 + r * (K / 8) + 8 * u));
                c.s[m][h].x = v.x;
                c.s[m][h].y = v.y;
            }
        }
    }
}

// y[r] for rows r < R (bf16 x and y). tiles = ceil(R / tc_tile_rows); the grid may be smaller (CTAs loop).
template <typename T, int FMT>
__global__ void __launch_bounds__(32 * TC_WARPS) tc_gemv_kernel(
        const unsigned char* __restrict__ p0, const unsigned char* __restrict__ p1,
        const unsigned char* __restrict__ p2, const unsigned char* __restrict__ p3,
        const void* __restrict__ x, void* __restrict__ y, int R, int K, int tiles) {
    constexpr bool need_sx = FMT != FMT_Q4_0 || !TC_SUB;
    __shared__ float red[TC_WARPS][TC_MT][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int grp = warp / TC_KSPLIT, ks = warp - grp * TC_KSPLIT;
    const int units = K >> 6, groups = (units + 3) >> 2;
    const bool xlane = (g >> 1) == t;      // this lane feeds x into B's column g
    const int xswap = (g & 1) * 32;        // lane 2t + 1: the unit's halves swapped (its column sums the second)
    // Q4_K: lane t's sub-blocks are 2t and 2t + 1 of every super-block: byte selectors and masks of their
    // (scale, min) decode (pairs 0, 1: six bits in bytes 0..7; pairs 2, 3: split over bytes 0..11)
    const unsigned j0 = (2 * t) & 3, j1 = j0 + 1;
    const unsigned sel = j0 | (j1 << 4) | ((4 + j0) << 8) | ((4 + j1) << 12);
    const unsigned sh = t < 2 ? 0 : 2, m_hi = t < 2 ? 0x3F3F3F3Fu : 0x30303030u, m_lo = t < 2 ? 0u : 0x0F0F0F0Fu;
    const uint4* xv = (const uint4*)x;     // x as 8-value vectors
    unsigned X[32];                        // the unit's 64 x values as bf16 pairs (zeros on lanes that feed none)
#pragma unroll
    for (int i = 0; i < 32; ++i) X[i] = 0u;

    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int r0 = (tile * tc_groups + grp) * TC_MT * 16;
        float acc[TC_MT][2];
#pragma unroll
        for (int m = 0; m < TC_MT; ++m) acc[m][0] = acc[m][1] = 0.f;
        TcCodes cur;
        if (TC_PIPE && ks < groups) tc_load<FMT>(cur, p0, p1, r0, g, R, K, min(4 * ks + t, units - 1));
        for (int c = ks; c < groups; c += TC_KSPLIT) {
            const int u = min(4 * c + t, units - 1);
            const bool valid = 4 * c + t < units;
            if (!TC_PIPE) tc_load<FMT>(cur, p0, p1, r0, g, R, K, u);
            TcCodes nxt;
            if (TC_PIPE && c + TC_KSPLIT < groups)
                tc_load<FMT>(nxt, p0, p1, r0, g, R, K, min(4 * (c + TC_KSPLIT) + t, units - 1));
            if (xlane) {
                const uint4* a = xv + (64 * u + xswap) / 8;
                const uint4* b = xv + (64 * u + 32 - xswap) / 8;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const uint4 va = __ldg(a + i), vb = __ldg(b + i);
                    X[4 * i] = va.x; X[4 * i + 1] = va.y; X[4 * i + 2] = va.z; X[4 * i + 3] = va.w;
                    X[16 + 4 * i] = vb.x; X[17 + 4 * i] = vb.y; X[18 + 4 * i] = vb.z; X[19 + 4 * i] = vb.w;
                }
            }
            float sx[4] = {0.f, 0.f, 0.f, 0.f};   // sx[0]: sum of the unit's first 32 x, sx[1]: the last 32
            if (need_sx) {
#pragma unroll
                for (int i = 0; i < 8; ++i) tc_mma(sx, TC_ONES, TC_ONES, TC_ONES, TC_ONES, X[2 * i], X[2 * i + 1]);
            }
#pragma unroll
            for (int m = 0; m < TC_MT; ++m) {
                float ca[4] = {0.f, 0.f, 0.f, 0.f}, cb[4] = {0.f, 0.f, 0.f, 0.f};   // the unit's halves
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    unsigned a[4], b[4];
                    tc_nibbles<FMT>(tc_word(cur.q[m][0], i), a);   // row 16 m + g
                    tc_nibbles<FMT>(tc_word(cur.q[m][1], i), b);   // row 16 m + 8 + g
#pragma unroll
                    for (int hi = 0; hi < 2; ++hi) {
                        const int xw = tc_xw<FMT>(i, hi);
                        tc_mma(tc_half<FMT>(i, hi) ? cb : ca, a[2 * hi], b[2 * hi], a[2 * hi + 1], b[2 * hi + 1],
                               X[xw], X[xw + 1]);
                    }
                }
                if (!TC_SUB) {   // remove the 128 (136) every code still carries
                    const float off = FMT == FMT_Q4_0 ? 136.f : 128.f;
                    ca[0] -= off * sx[0]; ca[2] -= off * sx[0]; cb[0] -= off * sx[1]; cb[2] -= off * sx[1];
                }
                if (valid) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const uint4 s = cur.s[m][h];
                        const float da = ca[2 * h], db = cb[2 * h];   // row 16 m + 8 h + g
                        if (FMT == FMT_Q4_K) {
                            const unsigned p = __byte_perm(s.y, s.z, sel), q = __byte_perm(s.w, s.w >> 4, sel);
                            const unsigned v = ((p >> sh) & m_hi) | (q & m_lo);   // sc_a, sc_b, mn_a, mn_b
                            const float d = ofl_half_bits((unsigned short)(s.x & 0xffffu));
                            const float dmin = ofl_half_bits((unsigned short)(s.x >> 16));
                            acc[m][h] += d * (byte_f(v, 0, 0.f) * da + byte_f(v, 1, 0.f) * db)
                                         - dmin * (byte_f(v, 2, 0.f) * sx[0] + byte_f(v, 3, 0.f) * sx[1]);
                        } else if (FMT == FMT_Q4_0) {
                            acc[m][h] += ofl_half_bits((unsigned short)(s.x & 0xffffu)) * da +
                                         ofl_half_bits((unsigned short)(s.x >> 16)) * db;
                        } else {
                            acc[m][h] += ofl_half_bits((unsigned short)(s.x & 0xffffu)) * da +
                                         ofl_half_bits((unsigned short)(s.x >> 16)) * sx[0] +
                                         ofl_half_bits((unsigned short)(s.y & 0xffffu)) * db +
                                         ofl_half_bits((unsigned short)(s.y >> 16)) * sx[1];
                        }
                    }
                }
            }
            if (TC_PIPE) cur = nxt;
        }
        // the row's sum: over the 4 lanes t of each g, then over the group's TC_KSPLIT warps
#pragma unroll
        for (int m = 0; m < TC_MT; ++m) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                acc[m][h] += ofl_shfl_xor(acc[m][h], 1);
                acc[m][h] += ofl_shfl_xor(acc[m][h], 2);
            }
        }
        if (TC_KSPLIT == 1) {
            if (t == 0) {
#pragma unroll
                for (int m = 0; m < TC_MT; ++m) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = r0 + 16 * m + 8 * h + g;
                        if (r < R) store1<T>(y, r, acc[m][h]);
                    }
                }
            }
        } else {
            if (t == 0) {
#pragma unroll
                for (int m = 0; m < TC_MT; ++m) {
                    red[warp][m][g] = acc[m][0];
                    red[warp][m][g + 8] = acc[m][1];
                }
            }
            __syncthreads();
            if (threadIdx.x < tc_tile_rows) {
                const int gi = threadIdx.x / (16 * TC_MT), rest = threadIdx.x - gi * 16 * TC_MT;
                float s = 0.f;
#pragma unroll
                for (int k = 0; k < TC_KSPLIT; ++k) s += red[gi * TC_KSPLIT + k][rest >> 4][rest & 15];
                const int r = (tile * tc_groups + gi) * TC_MT * 16 + rest;
                if (r < R) store1<T>(y, r, s);
            }
            __syncthreads();
        }
    }
}
