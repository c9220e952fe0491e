// Top-k rows per head of a score matrix, best first, in one launch: the selection step of sparse decode.
//
// grid = (Hkv), block = TK_THREADS. scores [Hkv, N] float32; only the first *count rows are candidates
// (a device-side count: a captured graph keeps working as chunks are appended). Radix select on the
// order-preserving integer image of each float finds the k-th largest key in four 8-bit passes; the
// keys above it and the first ties (lowest row first) are gathered into shared memory and sorted
// (bitonic, key descending, row ascending). With ids, the output is each row's id (the shadow index's candidates:
// their gather folded in). torch.topk took ~30 us per layer for this; see reference.topk_rows.
#include "common.cuh"

#define TK_THREADS 1024
#define TK_MAX_K 4096                       // shared memory: 8 bytes per slot

extern "C" __global__ void __launch_bounds__(TK_THREADS) topk_rows_kernel(
    const float* __restrict__ scores, long long N, const long long* __restrict__ count, int k,
    long long* __restrict__ out,               // [Hkv, k]
    const long long* __restrict__ ids)         // [Hkv, N]: out holds ids[h, row] instead of the row; or nullptr
{
    __shared__ unsigned int hist[256];
    __shared__ unsigned long long picked[TK_MAX_K];
    __shared__ unsigned int s_digit, s_above, s_taken, s_warp[TK_THREADS / 32];
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* row = scores + (long long)h * N;
    const long long n = min(*count, N);
    const unsigned int neg_inf_key = ofl_key(OFL_NEG_INF);
    auto key_at = [&](long long i) { return i < n ? ofl_key(row[i]) : neg_inf_key; };

    // 1. radix select: the k-th largest key, and how many of the keys equal to it to take
    unsigned int prefix = 0, mask = 0, remaining = (unsigned int)k;
    for (int shift = 24; shift >= 0; shift -= 8)
        ofl_radix_pass(key_at, N, shift, prefix, mask, remaining, hist, &s_digit, &s_above);
    // 2. gather: every key above the threshold (any order), then the first `remaining` ties in row order
    if (tid == 0) s_taken = 0;
    __syncthreads();
    for (long long base = 0; base < N; base += TK_THREADS) {
        const long long i = base + tid;
        const unsigned int u = i < N ? key_at(i) : 0u;
        const bool hit = i < N && u > prefix;
        const unsigned int b = __ballot_sync(0xffffffffu, hit);
        unsigned int first = 0;
        if (lane == 0 && b) first = atomicAdd(&s_taken, __popc(b));          // one atomic per warp
        first = __shfl_sync(0xffffffffu, first, 0);
        if (hit) picked[first + __popc(b & ((1u << lane) - 1u))] = ((unsigned long long)u << 32)
                                                                   | (0xffffffffu - (unsigned int)i);
    }
    __syncthreads();
    const unsigned int above = s_taken;
    unsigned int ties_done = 0;
    for (long long base = 0; base < N && ties_done < remaining; base += TK_THREADS) {   // uniform loop
        const long long i = base + tid;
        const bool tie = i < N && key_at(i) == prefix;
        const unsigned int b = __ballot_sync(0xffffffffu, tie);
        if (lane == 0) s_warp[warp] = __popc(b);
        __syncthreads();
        unsigned int before = ties_done;
        for (int w = 0; w < warp; ++w) before += s_warp[w];
        before += __popc(b & ((1u << lane) - 1u));
        if (tie && before < remaining)
            picked[above + before] = ((unsigned long long)prefix << 32) | (0xffffffffu - (unsigned int)i);
        unsigned int total = 0;
        for (int w = 0; w < TK_THREADS / 32; ++w) total += s_warp[w];
        __syncthreads();
        ties_done += total;
    }
    // 3. bitonic sort of the k picks, descending (key, then lower row first)
    int P = 1;
    while (P < k) P <<= 1;
    __syncthreads();
    auto row_of = [&](unsigned long long x) {
        const long long r = (long long)(0xffffffffu - (unsigned int)(x & 0xffffffffull));
        return ids == nullptr ? r : ids[(long long)h * N + r];
    };
    if (P <= TK_THREADS) {
        // one pick per thread in registers: strides under a warp exchange by shuffles, wider ones through shared
        // memory (a barrier per stage only for those: 15 of the 55 stages at P = 1024)
        unsigned long long a = tid < k ? picked[tid] : 0ull;    // threads >= P sort zeros among themselves
        for (int size = 2; size <= P; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                unsigned long long c;
                if (stride >= 32) {
                    __syncthreads();             // the last stage's reads are done
                    picked[tid] = a;
                    __syncthreads();
                    c = picked[tid ^ stride];
                } else {
                    c = __shfl_xor_sync(0xffffffffu, a, stride);
                }
                // the lower of the pair keeps the larger when this run sorts descending, the smaller otherwise
                a = (((tid & size) == 0) == ((tid & stride) == 0)) ? (a > c ? a : c) : (a < c ? a : c);
            }
        }
        if (tid < k) out[(long long)h * k + tid] = row_of(a);
        return;
    }
    for (int i = k + tid; i < P; i += TK_THREADS) picked[i] = 0ull;
    __syncthreads();
    for (int size = 2; size <= P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < P; i += TK_THREADS) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool desc = (i & size) == 0;
                    const unsigned long long a = picked[i], c = picked[j];
                    if (desc ? (a < c) : (a > c)) {
                        picked[i] = c;
                        picked[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = tid; i < k; i += TK_THREADS) out[(long long)h * k + i] = row_of(picked[i]);
}
