// The token stage ranked from low-rank key shadows: shadow_logits here, then select.cu's three-launch top k, then
// one attend_kernel launch over the picked rows where they lie (GPU pool or pinned host slab).
//
// shadow_logits_kernel  grid = (n_blocks, Hkv), block = SL_THREADS. Projects the head's query group on the
//   shadow basis (qp = q U, [G, R], in shared memory) and scores every candidate token from its shadow:
//   s[g, p] = scale * qp[g] . shadow(cand[h, p >> c_shift], p & (C - 1)), -inf where the candidate is not held
//   (cand < 0 or the part's slot < 0). Writes, by `mode`: SL_LOGITS [Hkv, G, M]; SL_GROUP_MAX [Hkv, M] (max over
//   the group); SL_CHUNK_LSE / SL_CHUNK_MAX [Hkv, G, K] (log-sum-exp / max over each chunk's C <= 32 tokens, the
//   shadow index's fine stage). With part: each block's (max, sum of exp) per query head (the softmax norm).
// chunk_reduce_kernel   the shadow index's chunk scores from the per-chunk values (below).
// Replaces ~40 torch launches per layer (kernels.tokens: token_logits, rank_logits, topk, gathers, _attend).
#include "common.cuh"

#define SL_THREADS 256
#define SL_LOGITS 0
#define SL_GROUP_MAX 1
#define SL_CHUNK_LSE 2
#define SL_CHUNK_MAX 3

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
    // the projection splits D over SPLIT threads per output so every thread works and each walks D / SPLIT rows
    // (the walk is latency-bound: it runs once per block, before any token)
    constexpr int SPLIT = G * R >= SL_THREADS ? 1 : SL_THREADS / (G * R);
    __shared__ float qp[G][R];
    __shared__ float qpart[SPLIT][G * R];
    __shared__ float red[SL_THREADS / 32][G][2];
    const int h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < G * R * SPLIT; i += SL_THREADS) {
        const int o = i % (G * R), part_d = i / (G * R), g = o / R, r = o - g * R;
        const int d0 = part_d * D / SPLIT, d1 = (part_d + 1) * D / SPLIT;
        const float* b = basis + (long long)h * D * R + r;
        const long long q0 = (long long)(h * G + g) * D;
        float a = 0.f;
#pragma unroll 16
        for (int d = d0; d < d1; ++d) a = fmaf(load_scalar<TQ>(q, q0 + d), b[(long long)d * R], a);
        qpart[part_d][o] = a;
    }
    __syncthreads();
    for (int o = tid; o < G * R; o += SL_THREADS) {
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < SPLIT; ++j) a += qpart[j][o];
        qp[o / R][o % R] = a;
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
        if (p < p1 && ofl_cand_held(cand, cand_stride, held, held_stride, h, j)) {
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
            for (int g = 0; g < G; ++g) s[g] *= scale;
            if (part != nullptr) {           // the running softmax norm only where it is asked for
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    const float m2 = fmaxf(mx[g], s[g]);
                    sm[g] = sm[g] * __expf(mx[g] - m2) + __expf(s[g] - m2);
                    mx[g] = m2;
                }
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
        ofl_warp_merge_max_sum(mx[g], sm[g]);
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
            ofl_warp_merge_max_sum(mx[g], sm[g]);
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
