// Quest chunk bounds: for query head g and chunk n, sum_d max(q_d*kmin_d, q_d*kmax_d) >= q.k for every
// key k of the chunk. Combined over the query group of a KV head by max (or sum), one float per chunk.
//
// grid = (ceil(n_valid / rows_per_block), Hkv). A chunk's kmin/kmax rows (D elements each) are read by
// LPR = D / VEC lanes with 16-byte loads, U rows in flight per lane; the G queries live in registers.
// The kernel is bandwidth bound (it reads 2 * Hkv * n_valid * D elements once); top-k runs after it.
#include "common.cuh"

#define SC_WARPS 4
#define SC_THREADS (SC_WARPS * 32)

template <typename TQ, typename T, int D, int G, bool SUM>
__global__ void __launch_bounds__(SC_THREADS) chunk_bounds_kernel(
    const void* __restrict__ q,              // [Hkv*G, D] TQ
    const uint4* __restrict__ kmin,          // [Hkv, N, D] T
    const uint4* __restrict__ kmax,          // [Hkv, N, D] T, same strides as kmin
    long long head_stride, long long row_stride,  // 16-byte units
    int n_valid, int rows_per_block,
    float* __restrict__ out)                 // [Hkv, n_valid]
{
    constexpr int VEC = T::VEC;
    constexpr int LPR = D / VEC;
    constexpr int RPW = 32 / LPR;
    constexpr int ROWS = SC_WARPS * RPW;
    constexpr int U = G <= 4 ? 4 : 2;
    static_assert(D % VEC == 0 && 32 % LPR == 0, "head_dim must give a power-of-two lane count <= 32");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int sub = lane % LPR, row = warp * RPW + lane / LPR;
    const int h = blockIdx.y;
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(r0 + rows_per_block, n_valid);

    float qf[G][VEC];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < VEC; ++i) qf[g][i] = load_scalar<TQ>(q, (long long)(h * G + g) * D + sub * VEC + i);

    const long long head_off = (long long)h * head_stride + sub;
    for (int base = r0; base < r1; base += ROWS * U) {       // uniform across the block: shuffles are safe
        uint4 lo[U], hi[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int n = base + u * ROWS + row;
            lo[u] = uint4{0u, 0u, 0u, 0u};
            hi[u] = lo[u];
            if (n < r1) {
                const long long off = head_off + (long long)n * row_stride;
                lo[u] = kmin[off];
                hi[u] = kmax[off];
            }
        }
        float b[G][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float lf[VEC], hf[VEC];
            unpack<T>(lo[u], lf);
            unpack<T>(hi[u], hf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float a = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) a += fmaxf(qf[g][i] * lf[i], qf[g][i] * hf[i]);
                b[g][u] = a;
            }
        }
        float res[U];
        if (SUM) {
            // a sum over the group commutes with the sum over lanes: reduce one value, not G
#pragma unroll
            for (int u = 0; u < U; ++u) {
                res[u] = 0.f;
#pragma unroll
                for (int g = 0; g < G; ++g) res[u] += b[g][u];
#pragma unroll
                for (int off = LPR / 2; off > 0; off >>= 1) res[u] += ofl_shfl_xor(res[u], off);
            }
        } else {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                res[u] = OFL_NEG_INF;
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    float a = b[g][u];
#pragma unroll
                    for (int off = LPR / 2; off > 0; off >>= 1) a += ofl_shfl_xor(a, off);
                    res[u] = fmaxf(res[u], a);
                }
            }
        }
        if (sub == 0) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int n = base + u * ROWS + row;
                if (n < r1) out[(long long)h * n_valid + n] = res[u];
            }
        }
    }
}
