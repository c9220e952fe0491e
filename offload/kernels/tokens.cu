// The token stage ranked from low-rank key shadows, in two launches (then one attend_kernel launch).
//
// shadow_logits_kernel  grid = (n_blocks, Hkv), block = SL_THREADS. Projects the head's query group on the
//   shadow basis (qp = q U, [G, R], in shared memory) and scores every candidate token from its shadow:
//   s[g, p] = scale * qp[g] . shadow(cand[h, p >> c_shift], p & (C - 1)), -inf where the candidate is not held
//   (cand < 0 or the part's slot < 0). Writes, by `mode`: SL_LOGITS [Hkv, G, M]; SL_GROUP_MAX [Hkv, M] (max over
//   the group); SL_CHUNK_LSE / SL_CHUNK_MAX [Hkv, G, K] (log-sum-exp / max over each chunk's C <= 32 tokens, the
//   shadow index's fine stage). With part: each block's (max, sum of exp) per query head (the softmax norm).
// token_select_kernel   grid = (Hkv), block = TS_THREADS, dynamic shared memory 4 * M bytes. Per KV head:
//   the rank of every candidate (sum: the group's summed softmax shares, normalised with the blocks' partial
//   log-sum-exp and base_lse; max: the logits' group max) kept in shared memory, a radix select of the k-th
//   largest, and an ordered compaction of the picks: keys above it, then the first ties by position; output in
//   position order (deterministic, no atomics on the output). Per pick: position, rank, held, and the token's
//   row in the pool (its chunk's slot * 2 * Hkv * C + token, flagged OFL_ALT_SLOT like the slot), which
//   attend_kernel reads as a chunk of one token, so picked K and V rows are read once, where they lie.
//   Plain rows (cand == nullptr): the top k of scores [Hkv, M] among the first *count (the shadow index's coarse
//   candidates, whose order does not matter: a sort-free topk_rows).
// Replaces ~40 torch launches per layer (kernels.tokens: token_logits, rank_logits, topk, gathers, _attend).
#include "common.cuh"

#define SL_THREADS 256
#define SL_LOGITS 0
#define SL_GROUP_MAX 1
#define SL_CHUNK_LSE 2
#define SL_CHUNK_MAX 3
#define TS_THREADS 1024

__device__ __forceinline__ unsigned int ts_key(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);   // larger float -> larger key
}

__device__ __forceinline__ float ts_unkey(unsigned int u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Whether candidate column j of head h holds a chunk: its id and (when given) the part's slot are >= 0.
__device__ __forceinline__ bool ts_held(const long long* cand, long long cand_stride, const int* held,
                                        long long held_stride, int h, int j) {
    return cand[h * cand_stride + j] >= 0 && (held == nullptr || held[h * held_stride + j] >= 0);
}

template <typename TQ, typename TS, int G, int R>
__global__ void __launch_bounds__(SL_THREADS) shadow_logits_kernel(
    const void* __restrict__ q,              // [Hkv*G, D] TQ
    const float* __restrict__ basis,         // [Hkv, D, R]
    const uint4* __restrict__ shadows,       // [Hkv, cap, C, R] TS, contiguous
    long long shadow_head,                   // cap * C * R / VEC (16-byte units)
    const long long* __restrict__ cand, long long cand_stride,   // [Hkv, K] chunk ids (-1: none)
    const int* __restrict__ held, long long held_stride,         // [Hkv, K] part slots (-1: none) or nullptr
    int M, int c_shift, int D, float scale, int per_block, int mode,
    float* __restrict__ out,                 // see `mode` above
    float* __restrict__ part)                // [Hkv, n_blocks, G, 2] (max, sum exp) or nullptr
{
    constexpr int VEC = TS::VEC, NV = R / VEC;
    static_assert(R % VEC == 0, "rank must fill whole 16-byte vectors");
    __shared__ float qp[G][R];
    __shared__ float red[SL_THREADS / 32][G][2];
    const int h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < G * R; i += SL_THREADS) {
        const int g = i / R, r = i - g * R;
        const float* b = basis + (long long)h * D * R + r;
        const long long q0 = (long long)(h * G + g) * D;
        float a = 0.f;
#pragma unroll 16                            // loads in flight: this runs once per block, before any token
        for (int d = 0; d < D; ++d) a = fmaf(load_scalar<TQ>(q, q0 + d), b[(long long)d * R], a);
        qp[g][r] = a;
    }
    __syncthreads();
    float mx[G], sm[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        mx[g] = OFL_NEG_INF;
        sm[g] = 0.f;
    }
    const int p0 = blockIdx.x * per_block, p1 = min(M, p0 + per_block), C = 1 << c_shift, K = M >> c_shift;
    for (int base = p0; base < p1; base += SL_THREADS) {     // uniform: chunk reductions shuffle across lanes
        const int p = base + tid, j = p >> c_shift;
        float s[G];
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] = OFL_NEG_INF;
        if (p < p1 && ts_held(cand, cand_stride, held, held_stride, h, j)) {
            const long long id = cand[h * cand_stride + j];
            const uint4* src = shadows + h * shadow_head + ((id << c_shift) + (p & (C - 1))) * NV;
            uint4 raw[NV];
#pragma unroll
            for (int v = 0; v < NV; ++v) raw[v] = src[v];
#pragma unroll
            for (int g = 0; g < G; ++g) s[g] = 0.f;
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                float f[VEC];
                unpack<TS>(raw[v], f);
#pragma unroll
                for (int g = 0; g < G; ++g)
#pragma unroll
                    for (int i = 0; i < VEC; ++i) s[g] = fmaf(qp[g][v * VEC + i], f[i], s[g]);
            }
#pragma unroll
            for (int g = 0; g < G; ++g) {
                s[g] *= scale;
                const float m2 = fmaxf(mx[g], s[g]);
                sm[g] = sm[g] * __expf(mx[g] - m2) + __expf(s[g] - m2);
                mx[g] = m2;
            }
        }
        if (mode == SL_LOGITS) {
            if (p < p1)
#pragma unroll
                for (int g = 0; g < G; ++g) out[((long long)h * G + g) * M + p] = s[g];
        } else if (mode == SL_GROUP_MAX) {
            float r = s[0];
#pragma unroll
            for (int g = 1; g < G; ++g) r = fmaxf(r, s[g]);
            if (p < p1) out[(long long)h * M + p] = r;
        } else {                              // one chunk = C consecutive lanes (C <= 32, chunks lane-aligned)
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float c = s[g];
                for (int off = C >> 1; off > 0; off >>= 1) c = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, off));
                if (mode == SL_CHUNK_LSE) {
                    float e = c == OFL_NEG_INF ? 0.f : __expf(s[g] - c);
                    for (int off = C >> 1; off > 0; off >>= 1) e += __shfl_xor_sync(0xffffffffu, e, off);
                    c = c == OFL_NEG_INF ? c : c + __logf(e);
                }
                if (p < p1 && (p & (C - 1)) == 0) out[((long long)h * G + g) * K + j] = c;
            }
        }
    }
    if (part == nullptr) return;
    // block reduce of the (max, sum) pairs per query head: shuffles, then one pair per warp
#pragma unroll
    for (int g = 0; g < G; ++g) {
        for (int off = 16; off > 0; off >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, mx[g], off), s2 = __shfl_xor_sync(0xffffffffu, sm[g], off);
            const float m = fmaxf(mx[g], m2);
            sm[g] = m == OFL_NEG_INF ? 0.f : sm[g] * __expf(mx[g] - m) + s2 * __expf(m2 - m);
            mx[g] = m;
        }
        if (lane == 0) {
            red[warp][g][0] = mx[g];
            red[warp][g][1] = sm[g];
        }
    }
    __syncthreads();
    if (tid < G) {
        float m = OFL_NEG_INF, s = 0.f;
        for (int w = 0; w < SL_THREADS / 32; ++w) {
            const float m2 = fmaxf(m, red[w][tid][0]);
            s = m2 == OFL_NEG_INF ? 0.f : s * __expf(m - m2) + red[w][tid][1] * __expf(red[w][tid][0] - m2);
            m = m2;
        }
        float* o = part + (((long long)h * gridDim.x + blockIdx.x) * G + tid) * 2;
        o[0] = m;
        o[1] = s;
    }
}

template <int G>
__global__ void __launch_bounds__(TS_THREADS) token_select_kernel(
    const float* __restrict__ logits,        // [Hkv, G, M] (sum) or [Hkv, M] ranks (max)
    const float* __restrict__ part, int n_parts,   // [Hkv, n_parts, G, 2] (sum) or nullptr
    const float* __restrict__ base_lse,      // [Hkv*G] or nullptr
    const long long* __restrict__ cand, long long cand_stride,
    const int* __restrict__ held, long long held_stride,
    int M, int c_shift, int k, int hkv,
    long long* __restrict__ out_idx,         // [Hkv, k] candidate positions, ascending
    float* __restrict__ out_val,             // [Hkv, k] their ranks
    bool* __restrict__ out_ok,               // [Hkv, k] held
    int* __restrict__ out_row,               // [Hkv, k] pool row of the token (flagged), -1 not held; or nullptr
    long long* __restrict__ rows_out,        // [1] += the held picks (statistics), or nullptr
    const long long* __restrict__ count)     // plain rows (cand == nullptr): only the first *count are held
{
    extern __shared__ unsigned int keys[];   // [M]
    __shared__ unsigned int hist[256];
    __shared__ float norm[G];
    __shared__ unsigned int s_digit, s_above, s_wa[TS_THREADS / 32], s_wt[TS_THREADS / 32];
    __shared__ unsigned int s_pa[TS_THREADS / 32], s_pt[TS_THREADS / 32], s_tot[2];
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const bool sum = part != nullptr;
    const long long n_rows = cand == nullptr ? min(*count, (long long)M) : 0;
    auto held_at = [&](int p) {
        return cand == nullptr ? p < n_rows : ts_held(cand, cand_stride, held, held_stride, h, p >> c_shift);
    };
    if (sum && tid < G) {
        float m = OFL_NEG_INF, s = 0.f;
        for (int b = 0; b < n_parts; ++b) {
            const float* pp = part + (((long long)h * n_parts + b) * G + tid) * 2;
            const float m2 = fmaxf(m, pp[0]);
            s = m2 == OFL_NEG_INF ? 0.f : s * expf(m - m2) + pp[1] * expf(pp[0] - m2);
            m = m2;
        }
        float lse = m == OFL_NEG_INF ? m : m + logf(s);
        if (base_lse != nullptr) {
            const float b = base_lse[h * G + tid], hi = fmaxf(lse, b);
            lse = hi == OFL_NEG_INF ? hi : hi + log1pf(expf(-fabsf(lse - b)));
        }
        norm[tid] = fabsf(lse) == -OFL_NEG_INF ? 0.f : lse;   // nothing valid: p = exp(-inf) = 0, not NaN
    }
    __syncthreads();
#pragma unroll 4
    for (int p = tid; p < M; p += TS_THREADS) {
        float r = OFL_NEG_INF;
        if (held_at(p)) {
            if (sum) {
                r = 0.f;
#pragma unroll
                for (int g = 0; g < G; ++g) r += __expf(logits[((long long)h * G + g) * M + p] - norm[g]);
            } else {
                r = logits[(long long)h * M + p];
            }
        }
        keys[p] = ts_key(r);
    }
    // radix select: the k-th largest key (prefix) and how many keys equal to it to take (remaining)
    unsigned int prefix = 0, mask = 0, remaining = (unsigned int)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += TS_THREADS) hist[i] = 0;
        __syncthreads();
        for (int base = 0; base < M; base += TS_THREADS) {   // uniform: the warp stays converged
            const int i = base + tid;
            const unsigned int u = i < M ? keys[i] : 0u;
            const bool take = i < M && (u & mask) == prefix;
            const unsigned int digit = (u >> shift) & 255u;
            if (__any_sync(0xffffffffu, take)) {     // later passes: most warps hold no key of the prefix
                const unsigned int peers = __match_any_sync(0xffffffffu, take ? digit : 256u);
                if (take && (__ffs(peers) - 1) == lane) atomicAdd(&hist[digit], __popc(peers));
            }
        }
        __syncthreads();
        if (warp == 0) ofl_find_digit(hist, remaining, lane, &s_digit, &s_above);
        __syncthreads();
        prefix |= s_digit << shift;
        remaining -= s_above;
        mask |= 255u << shift;
        __syncthreads();                     // s_digit / s_above are rewritten by the next pass
    }
    // ordered compaction: keys above prefix, and the first `remaining` ties by position, in position order
    unsigned int above_run = 0, ties_run = 0, n_ok = 0;
    const unsigned int lt = (1u << lane) - 1u;
    for (int base = 0; base < M; base += TS_THREADS) {
        const int i = base + tid;
        const unsigned int u = i < M ? keys[i] : 0u;
        const bool up = i < M && u > prefix, tie = i < M && u == prefix;
        const unsigned int ba = __ballot_sync(0xffffffffu, up), bt = __ballot_sync(0xffffffffu, tie);
        if (lane == 0) {
            s_wa[warp] = __popc(ba);
            s_wt[warp] = __popc(bt);
        }
        __syncthreads();
        if (warp == 0) {                      // exclusive prefix of the warps' counts, and the tile's totals
            const unsigned int a = s_wa[lane], t = s_wt[lane];
            unsigned int ia = a, it = t;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned int oa = __shfl_up_sync(0xffffffffu, ia, off), ot = __shfl_up_sync(0xffffffffu, it, off);
                if (lane >= off) {
                    ia += oa;
                    it += ot;
                }
            }
            s_pa[lane] = ia - a;
            s_pt[lane] = it - t;
            if (lane == 31) {
                s_tot[0] = ia;
                s_tot[1] = it;
            }
        }
        __syncthreads();
        const unsigned int a_w = above_run + s_pa[warp], t_w = ties_run + s_pt[warp];
        const unsigned int a_all = s_tot[0], t_all = s_tot[1];
        const unsigned int t_me = t_w + __popc(bt & lt);
        const bool pick = up || (tie && t_me < remaining);
        const bool ok = pick && held_at(i);
        if (pick) {
            const unsigned int pos = a_w + __popc(ba & lt) + min(t_me, remaining);
            const long long o = (long long)h * k + pos;
            const int j = i >> c_shift;
            out_idx[o] = i;
            out_val[o] = ts_unkey(u);
            out_ok[o] = ok;
            if (out_row != nullptr) {
                int row = -1;
                if (ok) {
                    const int s = held[h * held_stride + j];
                    const long long r = ((long long)(s & ~OFL_ALT_SLOT) * 2 * hkv << c_shift) + (i & ((1 << c_shift) - 1));
                    row = (int)r | (s & OFL_ALT_SLOT);
                }
                out_row[o] = row;
            }
        }
        above_run += a_all;
        ties_run += t_all;
        n_ok += __syncthreads_count(ok);     // also the barrier: s_wa / s_pa are rewritten by the next tile
    }
    if (rows_out != nullptr && tid == 0) atomicAdd((unsigned long long*)rows_out, (unsigned long long)n_ok);
}

// The shadow index's chunk scores from shadow_logits' per-chunk values x [Hkv, G, m] (SL_CHUNK_LSE or SL_CHUNK_MAX):
// mass: each chunk's softmax share among the candidates per query head, exp(x - logsumexp_m x), else x itself;
// then the group's max or sum; -inf for candidates past the chunk count (their rows hold no chunk).
// grid = (Hkv), block = CR_THREADS. Replaces ~8 torch launches per layer (ShadowKeyIndex._fine_scores).
#define CR_THREADS 256

template <int G>
__global__ void __launch_bounds__(CR_THREADS) chunk_reduce_kernel(
    const float* __restrict__ x, const long long* __restrict__ cand, const long long* __restrict__ count,
    int m, int mass, int group_sum, float* __restrict__ out)    // out: [Hkv, m]
{
    __shared__ float red[CR_THREADS / 32][G][2];
    __shared__ float lse[G];
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long n = *count;
    if (mass) {
        float mx[G], sm[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            mx[g] = OFL_NEG_INF;
            sm[g] = 0.f;
        }
        for (int j = tid; j < m; j += CR_THREADS) {
            if (cand[(long long)h * m + j] >= n) continue;
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float v = x[((long long)h * G + g) * m + j], m2 = fmaxf(mx[g], v);
                sm[g] = m2 == OFL_NEG_INF ? 0.f : sm[g] * __expf(mx[g] - m2) + __expf(v - m2);
                mx[g] = m2;
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
            for (int off = 16; off > 0; off >>= 1) {
                const float m2 = __shfl_xor_sync(0xffffffffu, mx[g], off), s2 = __shfl_xor_sync(0xffffffffu, sm[g], off);
                const float mm = fmaxf(mx[g], m2);
                sm[g] = mm == OFL_NEG_INF ? 0.f : sm[g] * __expf(mx[g] - mm) + s2 * __expf(m2 - mm);
                mx[g] = mm;
            }
            if (lane == 0) {
                red[warp][g][0] = mx[g];
                red[warp][g][1] = sm[g];
            }
        }
        __syncthreads();
        if (tid < G) {
            float mm = OFL_NEG_INF, ss = 0.f;
            for (int w = 0; w < CR_THREADS / 32; ++w) {
                const float m2 = fmaxf(mm, red[w][tid][0]);
                ss = m2 == OFL_NEG_INF ? 0.f : ss * __expf(mm - m2) + red[w][tid][1] * __expf(red[w][tid][0] - m2);
                mm = m2;
            }
            lse[tid] = mm == OFL_NEG_INF ? 0.f : mm + __logf(ss);
        }
        __syncthreads();
    }
    for (int j = tid; j < m; j += CR_THREADS) {
        float r = group_sum ? 0.f : OFL_NEG_INF;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float v = x[((long long)h * G + g) * m + j];
            if (mass) v = __expf(v - lse[g]);
            r = group_sum ? r + v : fmaxf(r, v);
        }
        out[(long long)h * m + j] = cand[(long long)h * m + j] < n ? r : OFL_NEG_INF;
    }
}
