// Attention and row gathers over compressed KV chunks (int8 / int4, layout in quant.py), read in place.
//
// A pool is raw ([S, 2, Hkv, C, D] of TR) or packed ([S, Hkv*(kpart+vpart)] bytes: the Hkv K parts, then the
// Hkv V parts); a launch reads two pools (the GPU pool and the pinned host slab, slots flagged OFL_ALT_SLOT in
// the second), each raw or packed. Packed chunks are dequantized in registers: a host chunk crosses PCIe at
// its compressed size. Packed part (one KV head's K or V): codes [C, D*BITS/8], then (x = code * step + min)
//     int8 K: min [C/Gk, D] fp16, step [C/Gk, D] u8 (fp16 bits = u8 << 7)    per channel over Gk tokens
//     int8 V: (step, min) [C] fp16 pairs                                      per token over the whole head
//     int4 K: (step, min) [C/Gk, D] fp16 pairs      int4 V: (step, min) [C, D/32] fp16 pairs
//
// attend_q_kernel: grid = (n_splits, Hkv), 4 warps; a block owns a run of chunks of one KV head and a warp
// takes one chunk at a time (so the raw/packed branch is uniform in the warp). A lane holds 8 channels of a
// row (LPR = D/8 lanes per row, RPW rows per warp) and keeps U rows in flight. Scales are read once per key
// group (Gk <= 32 rows): the K scales of the lane's channels and, for int8, the group's V pairs as one
// coalesced load (lane i: row i's pair), handed to the rows by shuffles; so the scales cross PCIe as whole
// lines, not as a 16-byte read per row. Code loads: 8 bytes per lane (int8), 16 lanes per 128-byte row,
// RPW rows per load adjacent: a warp reads whole lines. Softmax is online in base 2; rows, warps and splits
// merge as in attend.cu.
#include "common.cuh"

#define QA_WARPS 4
#define QA_THREADS (QA_WARPS * 32)
#define QA_MAX_SPLITS 128
#ifndef QA_U_SMALL                           // rows in flight per lane for G <= 4 (benchmarks may override)
#define QA_U_SMALL 4
#endif
#ifndef QA_U_BIG
#define QA_U_BIG 2
#endif
#ifndef QA_MIN_BLOCKS                        // blocks per SM the compiler must fit (caps registers), G > 4
#define QA_MIN_BLOCKS 1
#endif
#ifndef QA_MIN_BLOCKS_SMALL                  // the same for G <= 4: 3 keeps <= 168 registers without spills,
#define QA_MIN_BLOCKS_SMALL 3                // as layout 1's kernel had (a group's scales now live across its rows)
#endif
#define QA_VGROUP_SHIFT 5                    // int4: 32 channels per value scale

__device__ __forceinline__ void scale_pair(unsigned int w, float& s, float& m) {
    s = ofl_half_bits((unsigned short)(w & 0xffffu));
    m = ofl_half_bits((unsigned short)(w >> 16));
}

// 8 channels' K (step, min) of key group gi; sc = the part's scales (after its codes), ng = C/Gk groups
template <int D, int BITS>
__device__ __forceinline__ void key_scales(const unsigned char* sc, int gi, int ng, int sub, float* st, float* mn) {
    if (BITS == 8) {
        const uint4 m = *(const uint4*)(sc + (((long long)gi * D + sub * 8) << 1));
        const uint2 s = *(const uint2*)(sc + (long long)ng * D * 2 + (long long)gi * D + sub * 8);
        const unsigned int mw[4] = {m.x, m.y, m.z, m.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            mn[2 * i] = ofl_half_bits((unsigned short)(mw[i] & 0xffffu));
            mn[2 * i + 1] = ofl_half_bits((unsigned short)(mw[i] >> 16));
            st[i] = ofl_half_bits((unsigned short)(((s.x >> (8 * i)) & 0xffu) << 7));
            st[4 + i] = ofl_half_bits((unsigned short)(((s.y >> (8 * i)) & 0xffu) << 7));
        }
    } else {
        const uint4* p = (const uint4*)(sc + (((long long)gi * D + sub * 8) << 2));
        const uint4 a = p[0], b = p[1];
        const unsigned int kw[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) scale_pair(kw[i], st[i], mn[i]);
    }
}

// The V (step, min) pair of row t for channels sub*8.. ; sc = the V part's scales
template <int D, int BITS>
__device__ __forceinline__ unsigned int value_pair(const unsigned char* sc, long long t, int sub) {
    return BITS == 8 ? *(const unsigned int*)(sc + (t << 2))
                     : *(const unsigned int*)(sc + ((t * (D >> QA_VGROUP_SHIFT) + (sub >> 2)) << 2));
}

// The scales of one key group of a packed chunk, read once for its rows.
template <int D, int BITS> struct GroupScales {
    float kst[8], kmn[8];
    unsigned int vrow;                                      // int8: lane i holds row g0 + i's V pair

    __device__ __forceinline__ void load(const unsigned char* ksc, const unsigned char* vsc, int gi, int ng, int g0,
                                         int gk, int sub, int lane) {
        key_scales<D, BITS>(ksc, gi, ng, sub, kst, kmn);
        if (BITS == 8) vrow = lane < gk ? value_pair<D, 8>(vsc, g0 + lane, 0) : 0u;
    }

    // row t's V pair (all lanes call it: int8 shuffles); ok = the row exists
    __device__ __forceinline__ unsigned int vpair(const unsigned char* vsc, int t, int g0, int sub, bool ok) const {
        if (BITS == 8) return __shfl_sync(0xffffffffu, vrow, (t - g0) & 31);
        return ok ? value_pair<D, BITS>(vsc, t, sub) : 0u;
    }
};

// 8 codes of one lane -> floats; int8: 8 bytes, int4: 4 bytes (element 2i in the low nibble of byte i)
template <int BITS> struct Codes;
template <> struct Codes<8> {
    typedef uint2 Word;
    static __device__ __forceinline__ void decode(const Word& w, float* f) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[i] = (float)((w.x >> (8 * i)) & 0xffu);
            f[4 + i] = (float)((w.y >> (8 * i)) & 0xffu);
        }
    }
};
template <> struct Codes<4> {
    typedef unsigned int Word;
    static __device__ __forceinline__ void decode(const Word& w, float* f) {
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = (float)((w >> (4 * i)) & 0xfu);
    }
};

// 8 raw elements of one lane -> floats (16 bytes of bf16/f16, 32 of f32)
template <typename TR> __device__ __forceinline__ void load_raw8(const unsigned char* p, float* f) {
    unpack<TR>(*(const uint4*)p, f);
}
template <> __device__ __forceinline__ void load_raw8<F32>(const unsigned char* p, float* f) {
    unpack<F32>(((const uint4*)p)[0], f);
    unpack<F32>(((const uint4*)p)[1], f + 4);
}
template <typename TR> struct RawSize { static constexpr int B = 2; };
template <> struct RawSize<F32> { static constexpr int B = 4; };

// One lane's online-softmax state over the rows it has seen.
template <int G> struct LaneState {
    float m[G], l[G], acc[G][8];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            m[g] = OFL_NEG_INF;
            l[g] = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
        }
    }

    // U rows: k, v dequantized (this lane's 8 channels); ok = the row exists. Uniform across the warp.
    template <int U, int LPR>
    __device__ __forceinline__ void consume(const float (&qf)[G][8], const float (&k)[U][8],
                                            const float (&v)[U][8], const bool (&ok)[U]) {
        float s[G][U];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float a = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) a = fmaf(qf[g][i], k[u][i], a);
                s[g][u] = a;
            }
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1)
#pragma unroll
            for (int g = 0; g < G; ++g)
#pragma unroll
                for (int u = 0; u < U; ++u) s[g][u] += ofl_shfl_xor(s[g][u], off);
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (ok[u]) mx = fmaxf(mx, s[g][u]);
            if (mx == OFL_NEG_INF) continue;                 // nothing valid yet: state unchanged
            const float corr = exp2f(m[g] - mx);
            float psum = 0.f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                s[g][u] = ok[u] ? exp2f(s[g][u] - mx) : 0.f;
                psum += s[g][u];
            }
            l[g] = l[g] * corr + psum;
            m[g] = mx;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float a = acc[g][i] * corr;
#pragma unroll
                for (int u = 0; u < U; ++u) a = fmaf(s[g][u], v[u][i], a);
                acc[g][i] = a;
            }
        }
    }
};

// Rows r0 + u*RPW + rw of a packed chunk (K part kp, V part vp, codes first), all in key group g0.. (gs).
template <int D, int BITS, int U, int RPW>
__device__ __forceinline__ void load_packed(const unsigned char* kp, const unsigned char* vp, const unsigned char* vsc,
                                            const GroupScales<D, BITS>& gs, int r0, int g0, int rw, int sub, int c,
                                            float (&k)[U][8], float (&v)[U][8], bool (&ok)[U]) {
    typedef typename Codes<BITS>::Word Word;
    constexpr int ROW = D * BITS / 8;                       // code bytes per row
    Word kc[U], vc[U];
    unsigned int vs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int t = r0 + u * RPW + rw;
        ok[u] = t < c;
        if (ok[u]) {
            kc[u] = *(const Word*)(kp + (long long)t * ROW + sub * BITS);
            vc[u] = *(const Word*)(vp + (long long)t * ROW + sub * BITS);
        } else {
            kc[u] = Word();
            vc[u] = Word();
        }
        vs[u] = gs.vpair(vsc, t, g0, sub, ok[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        float f[8], vst, vmn;
        Codes<BITS>::decode(kc[u], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) k[u][i] = fmaf(f[i], gs.kst[i], gs.kmn[i]);
        Codes<BITS>::decode(vc[u], f);
        scale_pair(vs[u], vst, vmn);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[u][i] = fmaf(f[i], vst, vmn);
    }
}

template <typename TR, int D, int U, int RPW>
__device__ __forceinline__ void load_raw(const unsigned char* kp, const unsigned char* vp, int r0, int rw, int sub, int c,
                                         float (&k)[U][8], float (&v)[U][8], bool (&ok)[U]) {
    constexpr int ROW = D * RawSize<TR>::B;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int t = r0 + u * RPW + rw;
        ok[u] = t < c;
        if (ok[u]) {
            load_raw8<TR>(kp + (long long)t * ROW + sub * 8 * RawSize<TR>::B, k[u]);
            load_raw8<TR>(vp + (long long)t * ROW + sub * 8 * RawSize<TR>::B, v[u]);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) k[u][i] = v[u][i] = 0.f;
        }
    }
}

template <typename TQ, typename TR, int D, int G, int BITS, typename IdxT>
__global__ void __launch_bounds__(QA_THREADS, G <= 4 ? QA_MIN_BLOCKS_SMALL : QA_MIN_BLOCKS) attend_q_kernel(
    const void* __restrict__ q,                 // [Hkv*G, D] TQ
    const unsigned char* __restrict__ pool_a,   // slots without the flag
    const unsigned char* __restrict__ pool_b,   // slots flagged OFL_ALT_SLOT (may be null)
    int a_packed, int b_packed,
    const IdxT* __restrict__ slots,             // [Hkv, n_chunks], -1 = skip
    int n_chunks, int chunks_per_split, int n_splits, int hkv, int c_shift, int gk_shift, int kpart_bytes,
    int vpart_bytes, float scale,
    float* __restrict__ part_o,                 // [Hkv, n_splits, G, D]
    float* __restrict__ part_lse,               // [Hkv, n_splits, G] (base 2)
    unsigned int* __restrict__ tickets,         // [Hkv], zero between launches
    float* __restrict__ out_o,                  // [Hkv*G, D]
    float* __restrict__ out_lse)                // [Hkv*G] (natural log)
{
    constexpr int LPR = D / 8;
    constexpr int RPW = 32 / LPR;
    constexpr int U = G <= 4 ? QA_U_SMALL : QA_U_BIG;
    constexpr int NI = (G * D + QA_THREADS - 1) / QA_THREADS;
    static_assert(D % 8 == 0 && 32 % LPR == 0, "head_dim must give a power-of-two lane count <= 32");
    static_assert(RPW * U <= 32, "a rows step must stay inside one key group (Gk = 32 when C >= 32)");

    extern __shared__ int sm_slots[];
    __shared__ float sm_m[QA_WARPS][G], sm_l[QA_WARPS][G];
    __shared__ float sm_acc[QA_WARPS][G][D];
    __shared__ float sm_w[G][QA_MAX_SPLITS];
    __shared__ float sm_lse[G], sm_inv[G];
    __shared__ int sm_last;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int sub = lane % LPR, rw = lane / LPR;
    const int h = blockIdx.y, split = blockIdx.x;
    const int c0 = split * chunks_per_split;
    const int n_local = min(chunks_per_split, n_chunks - c0);
    const int c = 1 << c_shift;
    for (int j = tid; j < n_local; j += QA_THREADS) sm_slots[j] = (int)slots[(long long)h * n_chunks + c0 + j];

    float qf[G][8];
    const float qscale = scale * OFL_LOG2E;
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) qf[g][i] = load_scalar<TQ>(q, (long long)(h * G + g) * D + sub * 8 + i) * qscale;
    LaneState<G> st;
    st.init();
    __syncthreads();

    const long long raw_chunk = 2LL * hkv * c * D * RawSize<TR>::B;
    const long long packed_chunk = (long long)hkv * (kpart_bytes + vpart_bytes);
    const int gk = 1 << gk_shift, ng = c >> gk_shift, code_bytes = c * D * BITS / 8;
    for (int j = warp; j < n_local; j += QA_WARPS) {        // warp-uniform: one chunk per warp at a time
        int slot = sm_slots[j];
        if (slot < 0) continue;
        const bool alt = (slot & OFL_ALT_SLOT) != 0;
        slot &= ~OFL_ALT_SLOT;
        const unsigned char* pool = alt ? pool_b : pool_a;
        if (pool == nullptr) continue;
        float k[U][8], v[U][8];
        bool ok[U];
        if (alt ? b_packed : a_packed) {
            const unsigned char* chunk = pool + (long long)slot * packed_chunk;
            const unsigned char* kp = chunk + (long long)h * kpart_bytes;
            const unsigned char* vp = chunk + (long long)hkv * kpart_bytes + (long long)h * vpart_bytes;
            for (int gi = 0; gi < ng; ++gi) {                 // scales once per key group
                const int g0 = gi * gk;
                GroupScales<D, BITS> gs;
                gs.load(kp + code_bytes, vp + code_bytes, gi, ng, g0, gk, sub, lane);
                for (int r0 = g0; r0 < g0 + gk; r0 += RPW * U) {
                    load_packed<D, BITS, U, RPW>(kp, vp, vp + code_bytes, gs, r0, g0, rw, sub, c, k, v, ok);
                    st.template consume<U, LPR>(qf, k, v, ok);
                }
            }
        } else {
            const unsigned char* kp = pool + (long long)slot * raw_chunk + (long long)h * c * D * RawSize<TR>::B;
            const unsigned char* vp = kp + (long long)hkv * c * D * RawSize<TR>::B;
            for (int r0 = 0; r0 < c; r0 += RPW * U) {
                load_raw<TR, D, U, RPW>(kp, vp, r0, rw, sub, c, k, v, ok);
                st.template consume<U, LPR>(qf, k, v, ok);
            }
        }
    }

    // merge the RPW row states of a warp (lanes that share `sub`)
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float mo = ofl_shfl_xor(st.m[g], off), lo = ofl_shfl_xor(st.l[g], off);
            const float mx = fmaxf(st.m[g], mo);
            const float ms = mx == OFL_NEG_INF ? 0.f : mx;
            const float ws = exp2f(st.m[g] - ms), wo = exp2f(mo - ms);
            st.l[g] = st.l[g] * ws + lo * wo;
            st.m[g] = mx;
#pragma unroll
            for (int i = 0; i < 8; ++i) st.acc[g][i] = st.acc[g][i] * ws + ofl_shfl_xor(st.acc[g][i], off) * wo;
        }
    }
    if (lane < LPR) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sm_acc[warp][g][sub * 8 + i] = st.acc[g][i];
            if (sub == 0) {
                sm_m[warp][g] = st.m[g];
                sm_l[warp][g] = st.l[g];
            }
        }
    }
    __syncthreads();

    // merge the warps: this split's normalized output (the final one when there is a single split)
    const bool single = n_splits == 1;
    for (int idx = tid; idx < G * D; idx += QA_THREADS) {
        const int g = idx / D, d = idx % D;
        float mx = OFL_NEG_INF;
#pragma unroll
        for (int w = 0; w < QA_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        const float ms = mx == OFL_NEG_INF ? 0.f : mx;
        float lsum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < QA_WARPS; ++w) {
            const float wt = exp2f(sm_m[w][g] - ms);
            lsum += wt * sm_l[w][g];
            a += wt * sm_acc[w][g][d];
        }
        const float o = lsum > 0.f ? a / lsum : 0.f;
        const float lse2 = lsum > 0.f ? ms + log2f(lsum) : OFL_NEG_INF;
        if (single) {
            out_o[(long long)(h * G + g) * D + d] = o;
            if (d == 0) out_lse[h * G + g] = lse2 * OFL_LN2;
        } else {
            const long long p = ((long long)h * n_splits + split) * G + g;
            part_o[p * D + d] = o;
            if (d == 0) part_lse[p] = lse2;
        }
    }
    if (single) return;

    // the last block of this KV head merges all splits (threadfence-reduction pattern)
    __threadfence();
    __syncthreads();
    if (tid == 0) sm_last = atomicAdd(&tickets[h], 1u) == (unsigned int)(n_splits - 1);
    __syncthreads();
    if (!sm_last) return;
    __threadfence();
    const float* lse_h = part_lse + (long long)h * n_splits * G;
    for (int g = warp; g < G; g += QA_WARPS) {
        float mx = OFL_NEG_INF;
        for (int s = lane; s < n_splits; s += 32) mx = fmaxf(mx, __ldcg(lse_h + s * G + g));
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, ofl_shfl_xor(mx, off));
        const float ms = mx == OFL_NEG_INF ? 0.f : mx;
        float lsum = 0.f;
        for (int s = lane; s < n_splits; s += 32) {
            const float w = exp2f(__ldcg(lse_h + s * G + g) - ms);
            sm_w[g][s] = w;
            lsum += w;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) lsum += ofl_shfl_xor(lsum, off);
        if (lane == 0) {
            sm_lse[g] = lsum > 0.f ? (ms + log2f(lsum)) * OFL_LN2 : OFL_NEG_INF;
            sm_inv[g] = lsum > 0.f ? 1.f / lsum : 0.f;
        }
    }
    __syncthreads();
    float a[NI];
#pragma unroll
    for (int kk = 0; kk < NI; ++kk) a[kk] = 0.f;
    const float* o_h = part_o + (long long)h * n_splits * G * D;
    for (int s = 0; s < n_splits; ++s) {
#pragma unroll
        for (int kk = 0; kk < NI; ++kk) {
            const int idx = tid + kk * QA_THREADS;
            if (idx < G * D) a[kk] = fmaf(sm_w[idx / D][s], __ldcg(o_h + (long long)s * G * D + idx), a[kk]);
        }
    }
#pragma unroll
    for (int kk = 0; kk < NI; ++kk) {
        const int idx = tid + kk * QA_THREADS;
        if (idx < G * D) out_o[(long long)h * G * D + idx] = a[kk] * sm_inv[idx / D];
    }
    if (tid < G) out_lse[h * G + tid] = sm_lse[tid];
    if (tid == 0) tickets[h] = 0u;
}

// ---- single rows for the token stage ---------------------------------------------------------------
// out[h, r] = row `which` (0 K, 1 V) at position p = rows[h, r] (nullptr: p = r) of head h's slot list,
// converted to TO; zeros where p is outside the list or the slot is -1 (as gather.cu).
// grid = (ceil(R * D/8 / 256), Hkv); one thread per 8 channels of a row.
__device__ __forceinline__ unsigned int ofl_bf16_rn(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;          // round to nearest even (inputs are finite)
}
__device__ __forceinline__ unsigned int ofl_f16_rn(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
template <typename TO> __device__ __forceinline__ void store8(unsigned char* p, const float* f);
template <> __device__ __forceinline__ void store8<BF16>(unsigned char* p, const float* f) {
    uint4 w;
    w.x = ofl_bf16_rn(f[0]) | (ofl_bf16_rn(f[1]) << 16);
    w.y = ofl_bf16_rn(f[2]) | (ofl_bf16_rn(f[3]) << 16);
    w.z = ofl_bf16_rn(f[4]) | (ofl_bf16_rn(f[5]) << 16);
    w.w = ofl_bf16_rn(f[6]) | (ofl_bf16_rn(f[7]) << 16);
    *(uint4*)p = w;
}
template <> __device__ __forceinline__ void store8<F16>(unsigned char* p, const float* f) {
    uint4 w;
    w.x = ofl_f16_rn(f[0]) | (ofl_f16_rn(f[1]) << 16);
    w.y = ofl_f16_rn(f[2]) | (ofl_f16_rn(f[3]) << 16);
    w.z = ofl_f16_rn(f[4]) | (ofl_f16_rn(f[5]) << 16);
    w.w = ofl_f16_rn(f[6]) | (ofl_f16_rn(f[7]) << 16);
    *(uint4*)p = w;
}
template <> __device__ __forceinline__ void store8<F32>(unsigned char* p, const float* f) {
    ((uint4*)p)[0] = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    ((uint4*)p)[1] = make_uint4(__float_as_uint(f[4]), __float_as_uint(f[5]), __float_as_uint(f[6]), __float_as_uint(f[7]));
}

template <typename TR, typename TO, int D, int BITS>
__global__ void gather_rows_q_kernel(const unsigned char* __restrict__ pool_a, const unsigned char* __restrict__ pool_b,
                                     int a_packed, int b_packed, const int* __restrict__ slots, int n_slots,
                                     const long long* __restrict__ rows, int n_rows, int hkv, int c_shift, int gk_shift,
                                     int kpart_bytes, int vpart_bytes, int which, unsigned char* __restrict__ out) {
    constexpr int VPR = D / 8;
    const int h = blockIdx.y;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * VPR) return;
    const int r = (int)(t / VPR), sub = (int)(t - (long long)r * VPR);
    const long long p = rows != nullptr ? rows[(long long)h * n_rows + r] : (long long)r;
    float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (p >= 0 && (p >> c_shift) < n_slots) {
        int s = slots[(long long)h * n_slots + (p >> c_shift)];
        const bool alt = (s & OFL_ALT_SLOT) != 0;
        const unsigned char* pool = alt ? pool_b : pool_a;
        if (s >= 0 && pool != nullptr) {
            s &= ~OFL_ALT_SLOT;
            const int c = 1 << c_shift, off = (int)(p & (c - 1));
            if (alt ? b_packed : a_packed) {
                typedef typename Codes<BITS>::Word Word;
                constexpr int ROW = D * BITS / 8;
                const unsigned char* part = pool + (long long)s * hkv * (kpart_bytes + vpart_bytes)
                                            + (which == 0 ? (long long)h * kpart_bytes
                                                          : (long long)hkv * kpart_bytes + (long long)h * vpart_bytes);
                float code[8];
                Codes<BITS>::decode(*(const Word*)(part + (long long)off * ROW + sub * BITS), code);
                const unsigned char* sc = part + (long long)c * ROW;
                if (which == 0) {
                    float st[8], mn[8];
                    key_scales<D, BITS>(sc, off >> gk_shift, c >> gk_shift, sub, st, mn);
#pragma unroll
                    for (int i = 0; i < 8; ++i) f[i] = fmaf(code[i], st[i], mn[i]);
                } else {
                    float sv, mv;
                    scale_pair(value_pair<D, BITS>(sc, off, sub), sv, mv);
#pragma unroll
                    for (int i = 0; i < 8; ++i) f[i] = fmaf(code[i], sv, mv);
                }
            } else {
                const long long row = (((long long)s * 2 + which) * hkv + h) * c + off;
                load_raw8<TR>(pool + (row * D + sub * 8) * RawSize<TR>::B, f);
            }
        }
    }
    store8<TO>(out + (((long long)h * n_rows + r) * D + sub * 8) * RawSize<TO>::B, f);
}
