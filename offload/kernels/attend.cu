// Split-K flash-decoding over KV chunks: one decode query, GQA-aware.
//
// grid = (n_splits, Hkv); a block owns a run of `chunks_per_split` chunks of one KV head and serves the
// whole query group (G query heads) from one read of each K/V row, so bytes read do not grow with G.
// A row (one token, D elements) is read by LPR = D / VEC lanes, 16 bytes each; a warp covers RPW rows
// at once and every lane keeps U rows in flight (K and V) before it uses any, to hide memory latency
// (the pool may be pinned host memory read over PCIe through UVA: same code, longer latency).
// Softmax is online and in base 2 (q is pre-scaled by scale*log2 e); the last block to finish a KV
// head (atomic ticket) merges the splits, so a call is one launch.
//
// Addressing is generic so dense attention (sinks + window: k, v [Hkv, N, D]) uses the same kernel:
//   row(chunk j, token t) = base + slot(j) * slot_stride + h * head_stride + t * row_stride  (16-byte units)
//   slot(j) = slots[h, j] (gather; -1 = skip) or j (dense, slots == nullptr); tokens >= n_tokens are skipped.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)
#define ATT_MAX_SPLITS 128
#ifndef ATT_U_SMALL                          // rows in flight per lane for G <= 4 (benchmarks may override)
#define ATT_U_SMALL 4
#endif
#ifndef ATT_U_BIG                            // ... and for G > 4, where q and acc take more registers
#define ATT_U_BIG 2
#endif
#ifndef ATT_PREFETCH                         // 1: load step n+1 into registers while step n computes
#define ATT_PREFETCH 0
#endif

// Where one block's rows live. load() fetches the U rows a lane owns in one step; rows past the end,
// of a -1 slot or beyond n_tokens come back as zeros with ok = false.
struct RowSource {
    const uint4* k;
    const uint4* v;
    const uint4* k_alt;                      // the second pool (same layout), for slots flagged OFL_ALT_SLOT
    const uint4* v_alt;
    const int* slots;                        // shared memory: the block's slot list
    long long slot_stride, head_off, row_stride, tok0, n_tokens;
    int ntok, c_shift;

    template <int U, int ROWS>
    __device__ __forceinline__ void load(int base, int row, uint4* kr, uint4* vr, bool* ok) const {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + u * ROWS + row;
            kr[u] = uint4{0u, 0u, 0u, 0u};
            vr[u] = kr[u];
            ok[u] = false;
            if (i < ntok) {
                const int slot = slots[i >> c_shift];
                if (slot >= 0 && tok0 + i < n_tokens) {
                    const bool alt = (slot & OFL_ALT_SLOT) != 0;
                    const long long off = (long long)(slot & ~OFL_ALT_SLOT) * slot_stride + head_off
                                          + (long long)(i & ((1 << c_shift) - 1)) * row_stride;
                    kr[u] = (alt ? k_alt : k)[off];
                    vr[u] = (alt ? v_alt : v)[off];
                    ok[u] = true;
                }
            }
        }
    }
};

template <typename TQ, typename T, int D, int G, typename IdxT>
__global__ void __launch_bounds__(ATT_THREADS) attend_kernel(
    const void* __restrict__ q,              // [Hkv*G, D] TQ
    const uint4* __restrict__ k_base,        // K rows, T
    const uint4* __restrict__ v_base,        // V rows, T, same strides as K
    const IdxT* __restrict__ slots,          // [Hkv, n_chunks] or nullptr
    long long slot_stride, long long head_stride, long long row_stride,  // 16-byte units
    int c_shift, int n_chunks, long long n_tokens, int chunks_per_split, int n_splits, float scale,
    float* __restrict__ part_o,              // [Hkv, n_splits, G, D]
    float* __restrict__ part_lse,            // [Hkv, n_splits, G] (base 2)
    unsigned int* __restrict__ tickets,      // [Hkv], zero between launches
    float* __restrict__ out_o,               // [Hkv*G, D]
    float* __restrict__ out_lse,             // [Hkv*G] (natural log)
    const long long* __restrict__ n_tokens_dev,  // optional: the token count read on the device, so a
                                             // captured graph attends to a tail that grows between replays
    const uint4* __restrict__ k_alt,         // optional second pool: GPU-pool and host-slab chunks in one
    const uint4* __restrict__ v_alt)         // launch (slots flagged OFL_ALT_SLOT read from here)
{
    constexpr int VEC = T::VEC;
    constexpr int LPR = D / VEC;             // lanes per row
    constexpr int RPW = 32 / LPR;            // rows per warp
    constexpr int ROWS = ATT_WARPS * RPW;    // rows per block step
    constexpr int U = G <= 4 ? ATT_U_SMALL : ATT_U_BIG;  // rows in flight per lane
    constexpr int NI = (G * D + ATT_THREADS - 1) / ATT_THREADS;  // outputs per thread in the split merge
    static_assert(D % VEC == 0 && 32 % LPR == 0, "head_dim must give a power-of-two lane count <= 32");

    extern __shared__ int sm_slots[];                        // [chunks_per_split]
    __shared__ float sm_m[ATT_WARPS][G], sm_l[ATT_WARPS][G];
    __shared__ float sm_acc[ATT_WARPS][G][D];
    __shared__ float sm_w[G][ATT_MAX_SPLITS];
    __shared__ float sm_lse[G], sm_inv[G];
    __shared__ int sm_last;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int sub = lane % LPR, row = warp * RPW + lane / LPR;
    const int h = blockIdx.y, split = blockIdx.x;
    const int c0 = split * chunks_per_split;
    const int n_local = min(chunks_per_split, n_chunks - c0);
    for (int j = tid; j < n_local; j += ATT_THREADS)
        sm_slots[j] = slots ? (int)slots[(long long)h * n_chunks + c0 + j] : c0 + j;

    float qf[G][VEC];
    const float qscale = scale * OFL_LOG2E;
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < VEC; ++i)
            qf[g][i] = load_scalar<TQ>(q, (long long)(h * G + g) * D + sub * VEC + i) * qscale;

    float m[G], l[G], acc[G][VEC];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = OFL_NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
    }
    __syncthreads();

    const int ntok = n_local << c_shift;
    const RowSource src{k_base, v_base, k_alt, v_alt, sm_slots, slot_stride, (long long)h * head_stride + sub, row_stride,
                        (long long)c0 << c_shift, n_tokens_dev ? min(*n_tokens_dev, n_tokens) : n_tokens,
                        ntok, c_shift};
    uint4 kr[U], vr[U];
    bool ok[U];
#if ATT_PREFETCH
    src.load<U, ROWS>(0, row, kr, vr, ok);
#endif
    for (int base = 0; base < ntok; base += ROWS * U) {      // uniform across the block: shuffles are safe
#if ATT_PREFETCH
        uint4 kn[U], vn[U];
        bool okn[U];
        src.load<U, ROWS>(base + ROWS * U, row, kn, vn, okn);
#else
        src.load<U, ROWS>(base, row, kr, vr, ok);
#endif
        float s[G][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[VEC];
            unpack<T>(kr[u], kf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float a = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) a = fmaf(qf[g][i], kf[i], a);
                s[g][u] = a;
            }
        }
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1)
#pragma unroll
            for (int g = 0; g < G; ++g)
#pragma unroll
                for (int u = 0; u < U; ++u) s[g][u] += ofl_shfl_xor(s[g][u], off);
        // one max/rescale per U rows instead of per row; s becomes the probability p
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (ok[u]) mx = fmaxf(mx, s[g][u]);
            if (mx == OFL_NEG_INF) {                         // nothing valid yet: p = 0, state unchanged
#pragma unroll
                for (int u = 0; u < U; ++u) s[g][u] = 0.f;
                continue;
            }
            const float corr = exp2f(m[g] - mx);             // m = -inf -> 0
            float psum = 0.f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                s[g][u] = ok[u] ? exp2f(s[g][u] - mx) : 0.f;
                psum += s[g][u];
            }
            l[g] = l[g] * corr + psum;
            m[g] = mx;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] *= corr;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float vf[VEC];
            unpack<T>(vr[u], vf);
#pragma unroll
            for (int g = 0; g < G; ++g)
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(s[g][u], vf[i], acc[g][i]);
        }
#if ATT_PREFETCH
#pragma unroll
        for (int u = 0; u < U; ++u) {
            kr[u] = kn[u];
            vr[u] = vn[u];
            ok[u] = okn[u];
        }
#endif
    }

    // merge the RPW row states of a warp (lanes that share `sub`)
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float mo = ofl_shfl_xor(m[g], off), lo = ofl_shfl_xor(l[g], off);
            const float mx = fmaxf(m[g], mo);
            const float ms = mx == OFL_NEG_INF ? 0.f : mx;
            const float ws = exp2f(m[g] - ms), wo = exp2f(mo - ms);
            l[g] = l[g] * ws + lo * wo;
            m[g] = mx;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] = acc[g][i] * ws + ofl_shfl_xor(acc[g][i], off) * wo;
        }
    }
    if (lane < LPR) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) sm_acc[warp][g][sub * VEC + i] = acc[g][i];
            if (sub == 0) {
                sm_m[warp][g] = m[g];
                sm_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();

    // merge the warps; one split's normalized output (or the final one when there is a single split)
    const bool single = n_splits == 1;
    for (int idx = tid; idx < G * D; idx += ATT_THREADS) {
        const int g = idx / D, d = idx % D;
        float mx = OFL_NEG_INF;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        const float ms = mx == OFL_NEG_INF ? 0.f : mx;
        float lsum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) {
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
    for (int g = warp; g < G; g += ATT_WARPS) {
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
    for (int k = 0; k < NI; ++k) a[k] = 0.f;
    const float* o_h = part_o + (long long)h * n_splits * G * D;
#pragma unroll 4
    for (int s = 0; s < n_splits; ++s) {
#pragma unroll
        for (int k = 0; k < NI; ++k) {
            const int idx = tid + k * ATT_THREADS;
            if (idx < G * D) a[k] = fmaf(sm_w[idx / D][s], __ldcg(o_h + (long long)s * G * D + idx), a[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < NI; ++k) {
        const int idx = tid + k * ATT_THREADS;
        if (idx < G * D) out_o[(long long)h * G * D + idx] = a[k] * sm_inv[idx / D];
    }
    if (tid < G) out_lse[h * G + tid] = sm_lse[tid];
    if (tid == 0) tickets[h] = 0u;                           // ready for the next launch on this stream
}
