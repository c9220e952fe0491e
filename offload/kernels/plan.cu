// Slot plan of one sparse decode step for one layer, in one launch: which pool slots each KV head reads.
//
// grid = (Hkv), one block of PLAN_THREADS per KV head. The whole block walks the selection (one warp took 12.5 us a
// layer for ~520 ids, with one atomic per id on the same four hit counters; now one per warp and counter).
// Per head the attended chunk ids are the sinks, the local window (both from the device-side chunk count n, so a
// captured graph follows appends) and the first `budget` ids of the index's best-first selection that are neither
// (none for a streaming head). Each id is looked up in the device chunk table: its slot goes to the GPU-pool list
// or the host-slab list (-1 elsewhere; or one list with host slots flagged, for a two-pool gather_attend), and the
// per-tier and per-chunk hit counters are bumped for the store's policy. With ids_out the attended ids are written
// too (the store reads them back when some chunks must come from the drive).
// Replaces ~30 small torch ops per layer (see reference.plan_slots, the same thing in torch).
#include "common.cuh"

// merged: one list, host-slab slots flagged OFL_ALT_SLOT (host_out unused); else two lists. Returns the hit
// counter to bump: 0 padding, 1 + tier.
__device__ __forceinline__ int plan_emit(long long id, int pos, const signed char* tier, const long long* slot,
                                         float* chunk_hits, int* gpu_out, int* host_out, long long* ids_out,
                                         bool merged) {
    if (ids_out) ids_out[pos] = id < 0 ? -1 : id;
    if (id < 0) {
        gpu_out[pos] = -1;
        if (!merged) host_out[pos] = -1;
        return 0;
    }
    const int t = tier[id];
    const int s = (int)slot[id];
    if (merged) {
        gpu_out[pos] = t == 0 ? s : t == 1 ? (s | OFL_ALT_SLOT) : -1;
    } else {
        gpu_out[pos] = t == 0 ? s : -1;
        host_out[pos] = t == 1 ? s : -1;
    }
    atomicAdd(chunk_hits + id, 1.f);
    return t + 1;
}

// The warp's hits, one atomic per counter and warp (called by the whole warp; which < 0: nothing): every head's
// lanes bump the same four counters, and one atomic per lane serialised on them.
__device__ __forceinline__ void plan_count(unsigned long long* hits, int which, int lane) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const unsigned int b = __ballot_sync(0xffffffffu, which == c);
        if (lane == 0 && b) atomicAdd(hits + c, (unsigned long long)__popc(b));
    }
}

#define PLAN_THREADS 256

extern "C" __global__ void __launch_bounds__(PLAN_THREADS) plan_slots_kernel(
    const long long* __restrict__ sel,       // [Hkv, M] chunk ids, best first
    int M,
    const long long* __restrict__ n_valid,   // [1] full chunks
    int n_sink, int n_window, int budget,
    const bool* __restrict__ streaming,      // [Hkv]
    const signed char* __restrict__ tier,    // [max chunks] 0 gpu, 1 host, 2 disk
    const long long* __restrict__ slot,      // [max chunks]
    unsigned long long* __restrict__ hits,   // [4] padding, gpu, host, disk: sinks + window (+ selection)
    unsigned long long* __restrict__ sel_hits, // [4] the same for the M selection columns (may be == hits)
    float* __restrict__ chunk_hits,          // [max chunks]
    int* __restrict__ gpu_out,               // [Hkv, F + M]
    int* __restrict__ host_out,              // [Hkv, F + M] (unused when merged)
    long long* __restrict__ ids_out,         // [Hkv, F + M] or null
    int merged)
{
    __shared__ int s_warp[PLAN_THREADS / 32];
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long n = *n_valid;
    const int F = n_sink + n_window, K = F + M;
    int* g = gpu_out + (long long)h * K;
    int* o = host_out + (long long)h * K;
    long long* io = ids_out ? ids_out + (long long)h * K : nullptr;
    for (int base = 0; base < F; base += PLAN_THREADS) {      // uniform: plan_count is warp-wide
        const int j = base + tid;
        int which = -1;
        if (j < F) {
            const long long id = j < n_sink ? (long long)j : n - n_window + (j - n_sink);
            which = plan_emit(id, j, tier, slot, chunk_hits, g, o, io, merged);
        }
        plan_count(hits, which, lane);
    }
    // the budget keeps the first `budget` eligible ids in selection order: a block-wide running count
    const bool stream_head = streaming[h];
    int running = 0;
    for (int base = 0; base < M; base += PLAN_THREADS) {
        const int j = base + tid;
        const long long id = j < M ? sel[(long long)h * M + j] : -1;
        const bool cand = j < M && !stream_head && id >= n_sink && id < n - n_window;
        const unsigned int b = __ballot_sync(0xffffffffu, cand);
        if (lane == 0) s_warp[warp] = __popc(b);
        __syncthreads();
        int before = running, total = 0;
#pragma unroll
        for (int w = 0; w < PLAN_THREADS / 32; ++w) {
            before += w < warp ? s_warp[w] : 0;
            total += s_warp[w];
        }
        const int rank = before + __popc(b & (0xffffffffu >> (31 - lane)));   // inclusive
        running += total;
        int which = -1;
        if (j < M) which = plan_emit(cand && rank <= budget ? id : -1, F + j, tier, slot, chunk_hits, g, o, io, merged);
        plan_count(sel_hits, which, lane);
        __syncthreads();                     // s_warp is rewritten by the next tile
    }
}
