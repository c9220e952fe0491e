// The token mass threshold (token_mass) over the shadow-ranked token stage's top-k picks: one launch between
// select.cu's compaction and attend_kernel, so the stage stays on the GPU (the torch path took ~40 launches a layer).
//
// mass_keep_kernel  grid = (Hkv), block = MK_THREADS. The head's k <= MK_MAX picks (select_top's, in position order)
//   are sorted best first in shared memory (bitonic, on a 64-bit key: the rank's order-preserving bits, then the
//   complement of the column, so equal ranks stay in position order; not-held picks last). Their group-summed
//   shares are added in fixed point (ofl_mass_fixed, 2^-40): integer sums are exact in any order, so the kept set is
//   reference.mass_keep's. A pick is kept while the base share (G - the held candidates' total, from
//   select_rank_kernel: sinks, window and tail) plus the shares ahead of it stay below p * G, or while it is among
//   the first `floor`; the others get ok = false and row = -1, which attend_kernel skips as padding.
#include "common.cuh"

#define MK_THREADS 1024
#define MK_MAX 4096                          // picks per head (the keys fill 32 KB of shared memory)
#define MK_PER (MK_MAX / MK_THREADS)         // sorted keys per thread in the scan

extern "C" __global__ void __launch_bounds__(MK_THREADS) mass_keep_kernel(
    const float* __restrict__ val,           // [Hkv, k] the picks' group-summed shares, position order
    const unsigned long long* __restrict__ total,   // [Hkv] ofl_mass_fixed of every held candidate's, summed
    int k, int g, long long need, int floor, // need: round(p * G * 2^40) (reference.mass_need)
    bool* __restrict__ ok,                   // [Hkv, k] held; false where dropped
    int* __restrict__ row,                   // [Hkv, k] pool rows; -1 where dropped (or nullptr)
    long long* __restrict__ rows_out)        // [1] += the kept held picks (statistics), or nullptr
{
    __shared__ unsigned long long key[MK_MAX];
    __shared__ long long wsum[MK_THREADS / 32];
    __shared__ unsigned int s_kept;
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    bool* okh = ok + (long long)h * k;
    const float* vh = val + (long long)h * k;
    int n2 = 1;                               // the sort's width: a power of two, padded with key 0 (below every pick)
    while (n2 < k) n2 <<= 1;
    if (tid == 0) s_kept = 0;
    for (int i = tid; i < n2; i += MK_THREADS) {
        unsigned long long kk = 0ull;
        if (i < k) kk = ((unsigned long long)(okh[i] ? ofl_key(vh[i]) : 0u) << 32) | (~(unsigned int)i);
        key[i] = kk;
    }
    for (int size = 2; size <= n2; size <<= 1) {   // descending bitonic sort
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int t = tid; t < (n2 >> 1); t += MK_THREADS) {
                const int i = 2 * t - (t & (stride - 1)), j = i + stride;
                const unsigned long long a = key[i], b = key[j];
                if ((a < b) == ((i & size) == 0)) {   // runs with (i & size) == 0 descend, the others ascend
                    key[i] = b;
                    key[j] = a;
                }
            }
        }
    }
    __syncthreads();
    // exclusive prefix of the sorted shares: a run of MK_PER keys per thread, a warp scan, then the warps' totals
    const int i0 = tid * MK_PER;
    long long f[MK_PER], run = 0;
#pragma unroll
    for (int e = 0; e < MK_PER; ++e) {
        const unsigned int u = i0 + e < k ? (unsigned int)(key[i0 + e] >> 32) : 0u;
        f[e] = u ? ofl_mass_fixed(ofl_unkey(u)) : 0ll;
        run += f[e];
    }
    long long inc = run;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const long long o = __shfl_up_sync(0xffffffffu, inc, off);
        if (lane >= off) inc += o;
    }
    if (lane == 31) wsum[warp] = inc;
    __syncthreads();
    if (warp == 0) {                          // MK_THREADS / 32 == 32 warps: one lane each
        const long long w = wsum[lane];
        long long wi = w;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const long long o = __shfl_up_sync(0xffffffffu, wi, off);
            if (lane >= off) wi += o;
        }
        wsum[lane] = wi - w;
    }
    __syncthreads();
    long long before = wsum[warp] + inc - run;     // the shares of every key ahead of this thread's run
    const long long base = ((long long)g << OFL_MASS_SHIFT) - (long long)total[h];
    unsigned int kept = 0;
#pragma unroll
    for (int e = 0; e < MK_PER; ++e) {
        const int i = i0 + e;
        if (i < k) {
            const unsigned long long kk = key[i];
            const int col = (int)~(unsigned int)kk;
            if (base + before < need || i < floor) {
                kept += (kk >> 32) != 0ull;
            } else {
                okh[col] = false;
                if (row != nullptr) row[(long long)h * k + col] = -1;
            }
        }
        before += f[e];
    }
    if (rows_out == nullptr) return;
    if (kept) atomicAdd(&s_kept, kept);
    __syncthreads();
    if (tid == 0 && s_kept) atomicAdd((unsigned long long*)rows_out, (unsigned long long)s_kept);
}
