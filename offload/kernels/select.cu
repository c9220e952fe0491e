// Top-k of M keys per KV head over many blocks, in three launches: the token stage's select (and the shadow index's
// coarse candidates). One block per KV head walked 16K candidate tokens alone (73 us a layer at 128K); here the
// per-token work (ranks, the first radix digit, the ordered compaction) is spread over M / SEL_SLICE blocks per head
// and only the narrowing of the threshold stays in one block per head. On dummy weights the ~16K ranks share one
// first 8-bit digit (sign and 7 exponent bits), so narrowing from it read every key three times on one SM (27 us a
// layer); the rank kernel's global histogram of the keys' top 16 bits pins the k-th largest to a bucket of tens to
// hundreds of keys in one step, and only those are narrowed.
//
// select_rank_kernel<G, TOTAL> grid = (nb, Hkv), block = SEL_THREADS: the rank of each candidate of the block's slice of
//   SEL_SLICE positions -- sum: the group's summed softmax shares, normalised by the log-sum-exp of shadow_logits'
//   per-block (max, sum of exp) parts and base_lse; max: the logits' group max; plain rows (cand == nullptr): the
//   score itself among the first *count -- as an order-preserving key [Hkv, M], the slice's histogram of the
//   keys' top 8 bits [Hkv, nb, 256], and (atomics, all blocks; zeroed by the caller) the head's histogram of the
//   keys' top 16 bits [Hkv, 65536] and, for the token mass threshold (mass.cu), the sum of the held ranks in fixed
//   point [Hkv].
// select_threshold_kernel grid = (Hkv), block = ST_THREADS: sums the slices' histograms and finds the first digit d1
//   of the k-th largest key, then its second digit d2 from the 256 bins of the 16-bit histogram under d1; gathers the
//   keys of the bucket d1.d2 into shared memory in one pass over the head's keys (at most ST_BUCKET of them; else
//   they are read where they lie), counting per slice the keys of d1 above d2 on the way; narrows the threshold by
//   two radix passes over the bucket (8 bits each), counts per slice the bucket's keys above it and the ties (the
//   slices' histograms give the keys of higher first digits), and writes each slice's exclusive offsets.
// select_compact_kernel   grid = (nb, Hkv), block = SEL_THREADS: ordered compaction of the slice from its offsets:
//   keys above the threshold, then the first `remaining` ties of the head by position; output in position order
//   (deterministic: the same picks, position for position, as the one-block select it replaces). Per pick: position,
//   rank, held, and the token's row in the pool (its chunk's slot * 2 * Hkv * C + token, flagged OFL_ALT_SLOT like
//   the slot), which attend_kernel reads as a chunk of one token.
#include "common.cuh"

#define SEL_THREADS 256
#define SEL_SLICE 1024                      // positions per block of the rank and compact kernels
#define SEL_MAX_SLICES 64                   // so M <= 65536 (the launchers check)
#define ST_THREADS 1024
#define ST_LOADS 4                          // keys per thread in flight in the threshold kernel's gather pass
#ifndef ST_BUCKET                           // keys of the 16-bit bucket narrowed in shared memory (tests lower it)
#define ST_BUCKET 8192
#endif

template <int G, bool TOTAL>                  // TOTAL: the mass total (its own instantiation: no spill without it)
__global__ void __launch_bounds__(SEL_THREADS) select_rank_kernel(
    const float* __restrict__ logits,        // [Hkv, G, M] (sum) or [Hkv, M] ranks (max, plain rows)
    const float* __restrict__ part, int n_parts,   // [Hkv, n_parts, G, 2] (sum) or nullptr
    const float* __restrict__ base_lse,      // [Hkv*G] or nullptr
    const long long* __restrict__ cand, long long cand_stride,   // [Hkv, K] chunk ids, or nullptr: plain rows
    const int* __restrict__ held, long long held_stride,         // [Hkv, K] part slots or nullptr
    const long long* __restrict__ count,     // plain rows: only the first *count are candidates
    int M, int c_shift,
    unsigned int* __restrict__ keys,         // [Hkv, M]
    unsigned int* __restrict__ slice_hist,   // [Hkv, nb, 256]
    unsigned int* __restrict__ hist16,       // [Hkv, 65536], zeroed by the caller
    unsigned long long* __restrict__ total)  // TOTAL: [Hkv] += ofl_mass_fixed of the held ranks (zeroed)
{
    __shared__ unsigned int hist[256];
    __shared__ float norm[G];
    const int b = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const bool sum = part != nullptr;
    const long long n_rows = cand == nullptr ? min(*count, (long long)M) : 0;
    for (int i = tid; i < 256; i += SEL_THREADS) hist[i] = 0;
    if (sum && warp < G) {                   // every block combines the parts itself: warp g, a lane per part
        float m = OFL_NEG_INF, s = 0.f;
        for (int j = lane; j < n_parts; j += 32) {
            const float* pp = part + (((long long)h * n_parts + j) * G + warp) * 2;
            const float m2 = fmaxf(m, pp[0]);
            s = m2 == OFL_NEG_INF ? 0.f : s * expf(m - m2) + pp[1] * expf(pp[0] - m2);
            m = m2;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
            const float mm = fmaxf(m, m2);
            s = mm == OFL_NEG_INF ? 0.f : s * expf(m - mm) + s2 * expf(m2 - mm);
            m = mm;
        }
        if (lane == 0) {
            float lse = m == OFL_NEG_INF ? m : m + logf(s);
            if (base_lse != nullptr) {
                const float bl = base_lse[h * G + warp], hi = fmaxf(lse, bl);
                lse = hi == OFL_NEG_INF ? hi : hi + log1pf(expf(-fabsf(lse - bl)));
            }
            norm[warp] = fabsf(lse) == -OFL_NEG_INF ? 0.f : lse;   // nothing valid: p = exp(-inf) = 0, not NaN
        }
    }
    // the slice's logits and held flags are loaded before any is used (no load waits on another)
    constexpr int T = SEL_SLICE / SEL_THREADS;
    const int p0 = b * SEL_SLICE + tid;
    bool ok[T];
    float x[T][G];
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const int p = p0 + t * SEL_THREADS;
        ok[t] = p < M && (cand == nullptr ? p < n_rows
                                          : ofl_cand_held(cand, cand_stride, held, held_stride, h, p >> c_shift));
#pragma unroll
        for (int g = 0; g < G; ++g)
            x[t][g] = p < M ? logits[((long long)h * (sum ? G : 1) + (sum ? g : 0)) * M + p] : OFL_NEG_INF;
    }
    __syncthreads();                          // norm
    long long fx = 0;                         // the slice's held ranks in fixed point (the token mass threshold)
#pragma unroll
    for (int t = 0; t < T; ++t) {             // uniform: the histogram adds are warp-wide
        const int p = p0 + t * SEL_THREADS;
        float r = OFL_NEG_INF;
        if (ok[t]) {
            if (sum) {
                r = 0.f;
#pragma unroll
                for (int g = 0; g < G; ++g) r += __expf(x[t][g] - norm[g]);
            } else {
                r = x[t][0];
            }
            if (TOTAL) fx += ofl_mass_fixed(r);
        }
        const unsigned int u = ofl_key(r);
        if (p < M) keys[(long long)h * M + p] = u;
        ofl_hist_add(hist, p < M, u >> 24, lane);
        ofl_hist_add(hist16 + ((long long)h << 16), p < M, u >> 16, lane);   // red.add: nothing waits on it
    }
    if (TOTAL) {                              // integer adds: the head's sum is the same in any order
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) fx += __shfl_xor_sync(0xffffffffu, fx, off);
        if (lane == 0 && fx) atomicAdd(total + h, (unsigned long long)fx);
    }
    __syncthreads();
    unsigned int* out = slice_hist + ((long long)h * gridDim.x + b) * 256;
    for (int i = tid; i < 256; i += SEL_THREADS) out[i] = hist[i];
}

extern "C" __global__ void __launch_bounds__(ST_THREADS) select_threshold_kernel(
    const unsigned int* __restrict__ keys,   // [Hkv, M]
    const unsigned int* __restrict__ slice_hist,   // [Hkv, nb, 256]
    const unsigned int* __restrict__ hist16, // [Hkv, 65536]
    int M, int nb, int k,
    unsigned int* __restrict__ thresh,       // [Hkv, 2]: the k-th largest key, how many of its ties to take
    unsigned int* __restrict__ offsets)      // [Hkv, nb, 2]: keys above it / ties in the slices before each
{
    __shared__ unsigned int hist[256];
    __shared__ unsigned int cnt[SEL_MAX_SLICES * 2];     // per slice: keys above the threshold, ties
    __shared__ unsigned int bkey[ST_BUCKET];             // the keys of the 16-bit bucket (any order) ...
    __shared__ unsigned char bslice[ST_BUCKET];          // ... and their slices
    __shared__ unsigned int s_digit, s_above, s_n;
    const int h = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned int* row = keys + (long long)h * M;
    const unsigned int* sh = slice_hist + (long long)h * nb * 256;
    for (int i = tid; i < 256; i += ST_THREADS) hist[i] = 0;
    if (tid == 0) s_n = 0;
    __syncthreads();
    {                                         // the first digit's histogram: 4 threads per bin, a quarter of the slices each
        const int bin = tid & 255, q0 = tid >> 8;
        unsigned int s = 0;
#pragma unroll 4
        for (int b = q0; b < nb; b += ST_THREADS / 256) s += sh[b * 256 + bin];
        if (s) atomicAdd(&hist[bin], s);
    }
    __syncthreads();
    if (warp == 0) ofl_find_digit(hist, (unsigned int)k, lane, &s_digit, &s_above);
    __syncthreads();                          // warp 0 is done with hist: the second digit's bins replace it
    const unsigned int d1 = s_digit;
    unsigned int remaining = (unsigned int)k - s_above;
    if (tid < 256) hist[tid] = hist16[((long long)h << 16) + (d1 << 8) + tid];
    // per slice, the keys whose first digit is above d1 (from the slices' histograms); ties start at 0
    for (int b = warp; b < nb; b += ST_THREADS / 32) {
        unsigned int a = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) a += lane * 8 + i > (int)d1 ? sh[b * 256 + lane * 8 + i] : 0u;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
        if (lane == 0) {
            cnt[2 * b] = a;
            cnt[2 * b + 1] = 0;
        }
    }
    __syncthreads();
    if (warp == 0) ofl_find_digit(hist, remaining, lane, &s_digit, &s_above);
    __syncthreads();
    const unsigned int d12 = (d1 << 8) | s_digit, n2 = hist[s_digit];
    unsigned int prefix = d12 << 16, mask = 0xffff0000u;
    remaining -= s_above;
    __syncthreads();                          // hist, s_digit and s_above are rewritten below
    if (n2 <= ST_BUCKET) {                    // usual: gather the bucket's keys, narrow in shared memory
        const unsigned int lt = (1u << lane) - 1u;
        for (int base = 0; base < M; base += ST_THREADS * ST_LOADS) {
            unsigned int u[ST_LOADS];         // the loads first: none waits on another
#pragma unroll
            for (int j = 0; j < ST_LOADS; ++j) {
                const int i = base + j * ST_THREADS + tid;
                u[j] = i < M ? row[i] : 0u;
            }
#pragma unroll
            for (int j = 0; j < ST_LOADS; ++j) {   // uniform; a warp's 32 positions lie in one slice
                const int i = base + j * ST_THREADS + tid;
                const bool in = i < M && (u[j] >> 16) == d12;
                const bool up = i < M && (u[j] >> 24) == d1 && (u[j] >> 16) > d12;
                const unsigned int bal = __ballot_sync(0xffffffffu, in), ba = __ballot_sync(0xffffffffu, up);
                unsigned int first = 0;
                if (lane == 0 && bal) first = atomicAdd(&s_n, __popc(bal));
                if (lane == 0 && ba) atomicAdd(&cnt[2 * (i / SEL_SLICE)], __popc(ba));
                first = __shfl_sync(0xffffffffu, first, 0);
                if (in) {
                    bkey[first + __popc(bal & lt)] = u[j];
                    bslice[first + __popc(bal & lt)] = (unsigned char)(i / SEL_SLICE);
                }
            }
        }
        __syncthreads();
        auto bucket_at = [&](long long i) { return bkey[i]; };
        for (int shift = 8; shift >= 0; shift -= 8)
            ofl_radix_pass(bucket_at, n2, shift, prefix, mask, remaining, hist, &s_digit, &s_above);
        for (int base = 0; base < (int)n2; base += ST_THREADS) {   // uniform: the adds are warp-wide
            const int i = base + tid;
            const unsigned int u = i < (int)n2 ? bkey[i] : 0u;
            const unsigned int sl = i < (int)n2 ? bslice[i] : 0u;
            ofl_hist_add(cnt, i < (int)n2 && u >= prefix, 2 * sl + (u == prefix), lane);
        }
    } else {                                  // a crowded bucket (many equal keys): the passes read the keys where they lie
        auto key_at = [&](long long i) { return row[i]; };
        for (int shift = 8; shift >= 0; shift -= 8)
            ofl_radix_pass(key_at, M, shift, prefix, mask, remaining, hist, &s_digit, &s_above);
#pragma unroll 4
        for (int base = 0; base < M; base += ST_THREADS) {   // a warp's 32 positions lie in one slice
            const int i = base + tid;
            const unsigned int u = i < M ? row[i] : 0u;
            const bool in = i < M && (u >> 24) == d1;
            const unsigned int ba = __ballot_sync(0xffffffffu, in && u > prefix);
            const unsigned int bt = __ballot_sync(0xffffffffu, in && u == prefix);
            if (lane == 0 && (ba | bt)) {
                atomicAdd(&cnt[2 * (i / SEL_SLICE)], __popc(ba));
                atomicAdd(&cnt[2 * (i / SEL_SLICE) + 1], __popc(bt));
            }
        }
    }
    __syncthreads();
    if (warp == 0) {                          // exclusive prefix over the slices, 32 at a time
        unsigned int run_a = 0, run_t = 0;
        for (int b0 = 0; b0 < nb; b0 += 32) {
            const int b = b0 + lane;
            const unsigned int a = b < nb ? cnt[2 * b] : 0u, t = b < nb ? cnt[2 * b + 1] : 0u;
            unsigned int ia = a, it = t;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned int oa = __shfl_up_sync(0xffffffffu, ia, off), ot = __shfl_up_sync(0xffffffffu, it, off);
                if (lane >= off) {
                    ia += oa;
                    it += ot;
                }
            }
            if (b < nb) {
                unsigned int* o = offsets + ((long long)h * nb + b) * 2;
                o[0] = run_a + ia - a;
                o[1] = run_t + it - t;
            }
            run_a += __shfl_sync(0xffffffffu, ia, 31);
            run_t += __shfl_sync(0xffffffffu, it, 31);
        }
        if (lane == 0) {
            thresh[h * 2] = prefix;
            thresh[h * 2 + 1] = remaining;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS) select_compact_kernel(
    const unsigned int* __restrict__ keys, const unsigned int* __restrict__ thresh,
    const unsigned int* __restrict__ offsets,
    const long long* __restrict__ cand, long long cand_stride,
    const int* __restrict__ held, long long held_stride,
    const long long* __restrict__ count,     // plain rows (cand == nullptr): only the first *count are held
    int M, int c_shift, int k, int hkv,
    long long* __restrict__ out_idx,         // [Hkv, k] candidate positions, ascending
    float* __restrict__ out_val,             // [Hkv, k] their ranks
    bool* __restrict__ out_ok,               // [Hkv, k] held
    int* __restrict__ out_row,               // [Hkv, k] pool row of the token (flagged), -1 not held; or nullptr
    long long* __restrict__ rows_out)        // [1] += the held picks (statistics), or nullptr
{
    __shared__ unsigned int s_wa[SEL_THREADS / 32], s_wt[SEL_THREADS / 32];
    __shared__ unsigned int s_pa[SEL_THREADS / 32], s_pt[SEL_THREADS / 32];
    const int b = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned int prefix = thresh[h * 2], remaining = thresh[h * 2 + 1];
    const unsigned int* off = offsets + ((long long)h * gridDim.x + b) * 2;
    unsigned int above_run = off[0], ties_run = off[1], n_ok = 0;
    const long long n_rows = cand == nullptr ? min(*count, (long long)M) : 0;
    const unsigned int lt = (1u << lane) - 1u;
    for (int t = 0; t < SEL_SLICE / SEL_THREADS; ++t) {
        const int i = b * SEL_SLICE + t * SEL_THREADS + tid;
        const unsigned int u = i < M ? keys[(long long)h * M + i] : 0u;
        const bool up = i < M && u > prefix, tie = i < M && u == prefix;
        const unsigned int ba = __ballot_sync(0xffffffffu, up), bt = __ballot_sync(0xffffffffu, tie);
        if (lane == 0) {
            s_wa[warp] = __popc(ba);
            s_wt[warp] = __popc(bt);
        }
        __syncthreads();
        if (warp == 0) {                      // exclusive prefix of the warps' counts (8 warps)
            const unsigned int a = lane < SEL_THREADS / 32 ? s_wa[lane] : 0u, tt = lane < SEL_THREADS / 32 ? s_wt[lane] : 0u;
            unsigned int ia = a, it = tt;
#pragma unroll
            for (int o = 1; o < SEL_THREADS / 32; o <<= 1) {
                const unsigned int oa = __shfl_up_sync(0xffffffffu, ia, o), ot = __shfl_up_sync(0xffffffffu, it, o);
                if (lane >= o) {
                    ia += oa;
                    it += ot;
                }
            }
            if (lane < SEL_THREADS / 32) {
                s_pa[lane] = ia - a;
                s_pt[lane] = it - tt;
            }
        }
        __syncthreads();
        const unsigned int t_me = ties_run + s_pt[warp] + __popc(bt & lt);
        const bool pick = up || (tie && t_me < remaining);
        const bool ok = pick && (cand == nullptr ? i < n_rows
                                                 : ofl_cand_held(cand, cand_stride, held, held_stride, h, i >> c_shift));
        if (pick) {
            const unsigned int pos = above_run + s_pa[warp] + __popc(ba & lt) + min(t_me, remaining);
            const long long o = (long long)h * k + pos;
            out_idx[o] = i;
            out_val[o] = ofl_unkey(u);
            out_ok[o] = ok;
            if (out_row != nullptr) {
                int row = -1;
                if (ok) {
                    const int s = held[h * held_stride + (i >> c_shift)];
                    const long long r = ((long long)(s & ~OFL_ALT_SLOT) * 2 * hkv << c_shift) + (i & ((1 << c_shift) - 1));
                    row = (int)r | (s & OFL_ALT_SLOT);
                }
                out_row[o] = row;
            }
        }
        above_run += __syncthreads_count(up);    // also the barrier: s_wa / s_pa are rewritten by the next tile
        ties_run += __syncthreads_count(tie);
        n_ok += __syncthreads_count(ok);
    }
    if (rows_out != nullptr && tid == 0 && n_ok) atomicAdd((unsigned long long*)rows_out, (unsigned long long)n_ok);
}
