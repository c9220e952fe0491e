// The token mass threshold (token_mass) over the shadow-ranked token stage's top-k picks: one launch between
// select.cu's compaction and attend_kernel, so the stage stays on the GPU (the torch path took ~40 launches a layer).
//
// mass_keep_kernel  grid = (Hkv), block = MK_THREADS. Best first means the rank key descending (ofl_key of the pick's
//   group-summed share), equal keys in position order (the picks arrive in position order), not-held picks last. A
//   pick is kept while the base share (G - the held candidates' total, from select_rank_kernel: sinks, window and
//   tail) plus the shares ahead of it stay below p * G, or while it is among the first `floor`; the others get
//   ok = false and row = -1, which attend_kernel skips as padding. Shares are added in fixed point (ofl_mass_fixed,
//   2^-40): integer sums are exact in any order, so the kept set is reference.mass_keep's.
//   The kept picks are a prefix of the best-first order, so no sort is needed: the last kept pick is found by radix
//   select over the 32-bit keys (four 8-bit passes, each bin summing its picks' fixed-point shares and counting them).
//   The first pick whose running share reaches p lies in the bin where the bins' running sum first reaches it; inside
//   its key every pick has the same share, so how many of those equal keys are kept is a division. A floor above that
//   count is a second select by count. Equal keys are then kept in position order (a block scan of the ties). When
//   all picks together stay below p (dummy weights: the cap binds), nothing is selected: one pass over the picks.
#include "common.cuh"

#define MK_THREADS 512
#define MK_MAX 4096                          // picks per head
#define MK_PER (MK_MAX / MK_THREADS)         // consecutive picks (columns) per thread, kept in registers
#define MK_WARPS (MK_THREADS / 32)

// The sum over the block of one value per thread, in every thread. scratch: MK_WARPS shared slots, not reused by the
// caller before the next barrier.
template <typename T>
__device__ __forceinline__ T mk_block_sum(T x, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    T s = 0;
#pragma unroll 8
    for (int w = 0; w < MK_WARPS; ++w) s += scratch[w];
    return s;
}

// One radix pass's bins: each taking pick adds its share and one count to bin `d`. Shares are added as two 32-bit
// halves (f >> MK_LO_BITS, f & MK_LO_MASK) with native shared atomics: a 64-bit shared atomicAdd is a compare-and-swap
// loop that serialised picks of one warp sharing a bin (41 us a layer at 128K on spread ranks against 23.5 for the
// sort). The halves cannot overflow: at most MK_MAX low halves below 2^MK_LO_BITS each, and the high halves sum to
// the picks' total / 2^MK_LO_BITS (softmax shares: <= G * 2^40; any total under 2^52, shares summing below 4,096,
// fits). A warp whose picks all share one bin (the usual case on crowded ranks) adds once.
#define MK_LO_BITS 20
#define MK_LO_MASK ((1ll << MK_LO_BITS) - 1)
__device__ __forceinline__ void mk_bin_add(unsigned int* bhi, unsigned int* blo, unsigned int* bcnt, bool take,
                                           unsigned int d, long long f, int lane) {
    if (!__any_sync(0xffffffffu, take)) return;
    const unsigned int peers = __match_any_sync(0xffffffffu, take ? d : 0xffffffffu);
    if (peers == 0xffffffffu) {              // every lane takes, all in bin d: one add of the warp's sum
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) f += __shfl_xor_sync(0xffffffffu, f, off);
        if (lane == 0) {
            atomicAdd(bhi + d, (unsigned int)(f >> MK_LO_BITS));
            atomicAdd(blo + d, (unsigned int)(f & MK_LO_MASK));
            atomicAdd(bcnt + d, 32u);
        }
    } else if (take) {
        atomicAdd(bhi + d, (unsigned int)(f >> MK_LO_BITS));
        atomicAdd(blo + d, (unsigned int)(f & MK_LO_MASK));
        if (__ffs(peers) - 1 == lane) atomicAdd(bcnt + d, (unsigned int)__popc(peers));
    }
}

__device__ __forceinline__ long long mk_bin_sum(const unsigned int (*bins)[256], int d) {
    return ((long long)bins[0][d] << MK_LO_BITS) + (long long)bins[1][d];
}

// Radix select over the held picks' keys (u != 0), run by the whole block: the key of the best-first pick at which
// the running total first reaches `target` (weighted: of shares, else of counts), and the share sum and count of the
// keys above that key (above_s, above_c, in every thread). bins: two zeroed buffers of 256 bins (high halves, low
// halves, counts), zeroed again on return; res: 3 shared slots.
__device__ __forceinline__ unsigned int mk_select(const unsigned int (&u)[MK_PER], const long long (&f)[MK_PER],
                                                  long long target, bool weighted, unsigned int (*bins)[3][256],
                                                  long long* res, long long& above_s, long long& above_c) {
    const int tid = threadIdx.x, lane = tid & 31;
    unsigned int prefix = 0u, mask = 0u;
    above_s = 0;
    above_c = 0;
#pragma unroll 1
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass, buf = pass & 1;
#pragma unroll
        for (int e = 0; e < MK_PER; ++e)
            mk_bin_add(bins[buf][0], bins[buf][1], bins[buf][2], u[e] != 0u && (u[e] & mask) == prefix,
                       (u[e] >> shift) & 255u, f[e], lane);
        __syncthreads();
        if (tid < 32) {                      // lane l owns bins 255 - 8l .. 248 - 8l (lane 0: the best)
            long long own_s = 0, own_c = 0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                own_s += mk_bin_sum(bins[buf], 255 - 8 * lane - i);
                own_c += bins[buf][2][255 - 8 * lane - i];
            }
            long long inc_s = own_s, inc_c = own_c;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const long long os = __shfl_up_sync(0xffffffffu, inc_s, off);
                const long long oc = __shfl_up_sync(0xffffffffu, inc_c, off);
                if (lane >= off) {
                    inc_s += os;
                    inc_c += oc;
                }
            }
            const unsigned int hit = __ballot_sync(0xffffffffu, weighted ? above_s + inc_s >= target
                                                                         : above_c + inc_c >= target);
            const int first = hit ? __ffs(hit) - 1 : 31;   // the target is reached inside the held picks
            if (lane == first) {
                long long s = above_s + inc_s - own_s, c = above_c + inc_c - own_c;
                int d = 255 - 8 * lane;
                for (int i = 0; i < 7; ++i, --d) {
                    const long long bs = mk_bin_sum(bins[buf], d), bc = bins[buf][2][d];
                    if (weighted ? s + bs >= target : c + bc >= target) break;
                    s += bs;
                    c += bc;
                }
                res[0] = d;
                res[1] = s;
                res[2] = c;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)      // this buffer's next use is two passes on
                for (int part = 0; part < 3; ++part) bins[buf][part][255 - 8 * lane - i] = 0u;
        }
        __syncthreads();
        prefix |= (unsigned int)res[0] << shift;
        mask |= 255u << shift;
        above_s = res[1];
        above_c = res[2];
        __syncthreads();                     // res is rewritten by the next pass
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(MK_THREADS) mass_keep_kernel(
    const float* __restrict__ val,           // [Hkv, k] the picks' group-summed shares, position order
    const unsigned long long* __restrict__ total,   // [Hkv] ofl_mass_fixed of every held candidate's, summed
    int k, int g, long long need, int floor, // need: round(p * G * 2^40) (reference.mass_need); floor <= k
    bool* __restrict__ ok,                   // [Hkv, k] held; false where dropped
    int* __restrict__ row,                   // [Hkv, k] pool rows; -1 where dropped (or nullptr)
    long long* __restrict__ rows_out)        // [1] += the kept held picks (statistics), or nullptr
{
    __shared__ unsigned int s_bins[2][3][256];   // two passes' bins: high halves, low halves, counts
    __shared__ long long s_sum[MK_WARPS], s_cnt[MK_WARPS], s_tie[MK_WARPS], s_res[3];
    const int h = blockIdx.x, tid = threadIdx.x;
    bool* okh = ok + (long long)h * k;
    const float* vh = val + (long long)h * k;
    for (int i = tid; i < 2 * 3 * 256; i += MK_THREADS) (&s_bins[0][0][0])[i] = 0u;
    unsigned int u[MK_PER];                  // the pick's key, 0: not held (below every held pick)
    long long f[MK_PER], my_s = 0, my_c = 0;
#pragma unroll
    for (int e = 0; e < MK_PER; ++e) {
        const int col = tid * MK_PER + e;
        const bool held = col < k && okh[col];
        const float r = held ? vh[col] : 0.f;
        u[e] = held ? ofl_key(r) : 0u;
        f[e] = held ? ofl_mass_fixed(r) : 0ll;
        my_s += f[e];
        my_c += held;
    }
    const long long s_all = mk_block_sum(my_s, s_sum), n_held = mk_block_sum(my_c, s_cnt);
    const long long base = ((long long)g << OFL_MASS_SHIFT) - (long long)total[h];
    const long long want = need - base;      // the picks' share that reaches p
    // kept by the mass: the first t_mass best-first picks (every pick ahead of the one whose share reaches `want`)
    long long t_mass, above_s, above_c, tie_keep = 0;
    unsigned int last = 0xffffffffu;         // the last kept pick's key (with tie_keep: how many of its ties)
    if (want <= 0) {
        t_mass = 0;
    } else if (s_all < want) {
        t_mass = k;
    } else {
        last = mk_select(u, f, want, true, s_bins, s_res, above_s, above_c);
        const long long fv = ofl_mass_fixed(ofl_unkey(last));   // > 0: the bin that reaches `want` adds shares
        tie_keep = (want - above_s + fv - 1) / fv;               // ties up to and with the one that reaches it
        t_mass = above_c + tie_keep;
    }
    const long long kept = max(t_mass, (long long)floor);
    if (kept >= n_held) {                    // every held pick stays
        if (rows_out != nullptr && tid == 0 && n_held)
            atomicAdd((unsigned long long*)rows_out, (unsigned long long)n_held);
        return;
    }
    if (kept == 0) {
        last = 0xffffffffu;                  // no held key is above it, none of its ties kept
        tie_keep = 0;
    } else if (t_mass < floor) {             // the floor decides: the floor-th best pick
        last = mk_select(u, f, kept, false, s_bins, s_res, above_s, above_c);
        tie_keep = kept - above_c;
    }
    // equal keys in position order: the ties in columns before this thread's
    long long my_ties = 0;
#pragma unroll
    for (int e = 0; e < MK_PER; ++e) my_ties += u[e] != 0u && u[e] == last;
    const int lane = tid & 31, warp = tid >> 5;
    long long inc = my_ties;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const long long o = __shfl_up_sync(0xffffffffu, inc, off);
        if (lane >= off) inc += o;
    }
    if (lane == 31) s_tie[warp] = inc;
    __syncthreads();
    long long tie_rank = inc - my_ties;
    for (int w = 0; w < warp; ++w) tie_rank += s_tie[w];
#pragma unroll
    for (int e = 0; e < MK_PER; ++e) {
        if (u[e] == 0u || u[e] > last) continue;
        if (u[e] == last && tie_rank++ < tie_keep) continue;
        const int col = tid * MK_PER + e;
        okh[col] = false;
        if (row != nullptr) row[(long long)h * k + col] = -1;
    }
    if (rows_out != nullptr && tid == 0) atomicAdd((unsigned long long*)rows_out, (unsigned long long)kept);
}
