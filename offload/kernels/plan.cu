// Slot plan of one sparse decode step for one layer, in one launch: which pool slots each KV head reads.
//
// grid = (Hkv), one block per KV head. Per head the attended chunk ids are the sinks, the local window
// (both from the device-side chunk count n, so a captured graph follows appends) and the first `budget`
// ids of the index's best-first selection that are neither (none for a streaming head). Each id is
// looked up in the device chunk table: its slot goes to the GPU-pool list or the host-slab list
// (-1 elsewhere; or one list with host slots flagged, for a two-pool gather_attend), and the per-tier
// and per-chunk hit counters are bumped for the store's policy. With ids_out the attended ids are written
// too (the store reads them back when some chunks must come from the drive).
// Replaces ~30 small torch ops per layer (see reference.plan_slots, the same thing in torch).
#include "common.cuh"

// merged: one list, host-slab slots flagged OFL_ALT_SLOT (host_out unused); else two lists.
__device__ __forceinline__ void plan_emit(long long id, int pos, const signed char* tier, const long long* slot,
                                          unsigned long long* hits, float* chunk_hits, int* gpu_out, int* host_out,
                                          long long* ids_out, bool merged) {
    if (ids_out) ids_out[pos] = id < 0 ? -1 : id;
    if (id < 0) {
        gpu_out[pos] = -1;
        if (!merged) host_out[pos] = -1;
        atomicAdd(hits, 1ull);                              // hits[0]: padding
        return;
    }
    const int t = tier[id];
    const int s = (int)slot[id];
    if (merged) {
        gpu_out[pos] = t == 0 ? s : t == 1 ? (s | OFL_ALT_SLOT) : -1;
    } else {
        gpu_out[pos] = t == 0 ? s : -1;
        host_out[pos] = t == 1 ? s : -1;
    }
    atomicAdd(hits + (t + 1), 1ull);
    atomicAdd(chunk_hits + id, 1.f);
}

extern "C" __global__ void plan_slots_kernel(
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
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31;
    const long long n = *n_valid;
    const int F = n_sink + n_window, K = F + M;
    int* g = gpu_out + (long long)h * K;
    int* o = host_out + (long long)h * K;
    long long* io = ids_out ? ids_out + (long long)h * K : nullptr;
    for (int j = tid; j < F; j += blockDim.x) {
        const long long id = j < n_sink ? (long long)j : n - n_window + (j - n_sink);
        plan_emit(id, j, tier, slot, hits, chunk_hits, g, o, io, merged);
    }
    if (tid >= 32) return;
    // warp 0: the budget keeps the first `budget` eligible ids in selection order (a running count)
    const bool stream_head = streaming[h];
    int running = 0;
    for (int base = 0; base < M; base += 32) {
        const int j = base + lane;
        const long long id = j < M ? sel[(long long)h * M + j] : -1;
        const bool cand = j < M && !stream_head && id >= n_sink && id < n - n_window;
        const unsigned int b = __ballot_sync(0xffffffffu, cand);
        const int rank = running + __popc(b & (0xffffffffu >> (31 - lane)));   // inclusive
        running += __popc(b);
        if (j < M) plan_emit(cand && rank <= budget ? id : -1, F + j, tier, slot, sel_hits, chunk_hits,
                             g, o, io, merged);
    }
}
