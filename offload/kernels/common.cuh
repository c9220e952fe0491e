// Shared by the offload kernels. NVRTC gets no standard headers, so everything here is builtins only.
// The Python loader pastes this file in place of the include line of each kernel file.

#define OFL_NEG_INF __int_as_float(0xff800000)
#define OFL_LOG2E 1.4426950408889634f
#define OFL_LN2 0.6931471805599453f
// a slot with this bit set lives in the second ("alt") pool of a gather: the host slab next to the GPU pool
#define OFL_ALT_SLOT (1 << 30)

// Storage tags. VEC = elements per 16-byte load: every kernel reads K/V in 16-byte vectors.
struct BF16 { static constexpr int VEC = 8; };
struct F16 { static constexpr int VEC = 8; };
struct F32 { static constexpr int VEC = 4; };

__device__ __forceinline__ float ofl_half_bits(unsigned short bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

// 16 bytes -> VEC floats; element 2i sits in the low half of word i (little endian).
template <typename T> __device__ __forceinline__ void unpack(const uint4& raw, float* f);

template <> __device__ __forceinline__ void unpack<BF16>(const uint4& raw, float* f) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);           // bf16 is the top half of an fp32
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <> __device__ __forceinline__ void unpack<F16>(const uint4& raw, float* f) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = ofl_half_bits((unsigned short)(w[i] & 0xffffu));
        f[2 * i + 1] = ofl_half_bits((unsigned short)(w[i] >> 16));
    }
}

template <> __device__ __forceinline__ void unpack<F32>(const uint4& raw, float* f) {
    f[0] = __uint_as_float(raw.x);
    f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z);
    f[3] = __uint_as_float(raw.w);
}

// One element of a small tensor (the query): no alignment needed, read once per block.
template <typename T> __device__ __forceinline__ float load_scalar(const void* p, long long i);

template <> __device__ __forceinline__ float load_scalar<BF16>(const void* p, long long i) {
    return __uint_as_float(((unsigned int)((const unsigned short*)p)[i]) << 16);
}

template <> __device__ __forceinline__ float load_scalar<F16>(const void* p, long long i) {
    return ofl_half_bits(((const unsigned short*)p)[i]);
}

template <> __device__ __forceinline__ float load_scalar<F32>(const void* p, long long i) {
    return ((const float*)p)[i];
}

__device__ __forceinline__ float ofl_shfl_xor(float x, int mask) {
    return __shfl_xor_sync(0xffffffffu, x, mask);
}

// The order-preserving unsigned image of a float (larger float -> larger key) and back.
// Online-softmax state (running max mx, sum of exp(x - mx)) of one warp's lanes merged into every lane.
__device__ __forceinline__ void ofl_warp_merge_max_sum(float& mx, float& sm) {
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, mx, off), s2 = __shfl_xor_sync(0xffffffffu, sm, off);
        const float m = fmaxf(mx, m2);
        sm = m == OFL_NEG_INF ? 0.f : sm * __expf(mx - m) + s2 * __expf(m2 - m);
        mx = m;
    }
}

__device__ __forceinline__ unsigned int ofl_key(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float ofl_unkey(unsigned int u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// A softmax share as an integer multiple of 2^-40 (reference.mass_fixed; the double product is exact, the rounding
// to nearest even): the token mass threshold adds these, exact in any order, so it keeps what torch keeps.
#define OFL_MASS_SHIFT 40
__device__ __forceinline__ long long ofl_mass_fixed(float r) {
    return __double2ll_rn((double)r * (double)(1ll << OFL_MASS_SHIFT));
}

// Whether candidate column j of head h holds a chunk (the token stage): its chunk id and, when given, the part's
// slot are >= 0.
__device__ __forceinline__ bool ofl_cand_held(const long long* cand, long long cand_stride, const int* held,
                                              long long held_stride, int h, int j) {
    return cand[h * cand_stride + j] >= 0 && (held == nullptr || held[h * held_stride + j] >= 0);
}

// Adds the warp's `take` lanes to a histogram (shared, or global: the select's 16-bit one), called by the whole
// (converged) warp: keys cluster in a few digits, so one atomic per distinct digit in the warp, not per lane; a warp
// with no key skips the match.
__device__ __forceinline__ void ofl_hist_add(unsigned int* hist, bool take, unsigned int digit, int lane) {
    if (__any_sync(0xffffffffu, take)) {
        const unsigned int peers = __match_any_sync(0xffffffffu, take ? digit : 0xffffffffu);
        if (take && (__ffs(peers) - 1) == lane) atomicAdd(&hist[digit], __popc(peers));
    }
}

// Radix select step, run by one whole warp: the digit d of a 256-bin histogram that holds the `remaining`-th
// largest key, and how many keys lie in the digits above d (a warp scan instead of a serial walk of 256 bins).
__device__ __forceinline__ void ofl_find_digit(const unsigned int* hist, unsigned int remaining, int lane,
                                              unsigned int* s_digit, unsigned int* s_above) {
    unsigned int own = 0;                       // lane l owns digits 255 - 8l .. 248 - 8l (lane 0: the top)
#pragma unroll
    for (int i = 0; i < 8; ++i) own += hist[255 - 8 * lane - i];
    unsigned int incl = own;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned int o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
    }
    const unsigned int hit = __ballot_sync(0xffffffffu, incl >= remaining);
    const int first = hit ? __ffs(hit) - 1 : 31;
    if (lane == first) {
        unsigned int above = incl - own;
        int d = 255 - 8 * lane;
        for (int i = 0; i < 7; ++i, --d) {
            if (above + hist[d] >= remaining) break;
            above += hist[d];
        }
        *s_digit = (unsigned int)d;
        *s_above = above;
    }
}

// One radix-select pass, run by the whole block: the 256-bin histogram of digit (key >> shift) & 255 over the keys
// key_at(i), i < n, whose bits under `mask` equal `prefix`, then the digit that holds the `remaining`-th largest:
// prefix, mask and remaining narrow to it. hist: 256 shared bins; s_digit / s_above: shared scratch.
template <typename KeyAt>
__device__ __forceinline__ void ofl_radix_pass(KeyAt key_at, long long n, int shift, unsigned int& prefix,
                                               unsigned int& mask, unsigned int& remaining, unsigned int* hist,
                                               unsigned int* s_digit, unsigned int* s_above) {
    const int tid = threadIdx.x, lane = tid & 31;
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
#pragma unroll 4
    for (long long base = 0; base < n; base += blockDim.x) {        // uniform: the warp stays converged
        const long long i = base + tid;
        const unsigned int u = i < n ? key_at(i) : 0u;
        ofl_hist_add(hist, i < n && (u & mask) == prefix, (u >> shift) & 255u, lane);
    }
    __syncthreads();
    if (tid < 32) ofl_find_digit(hist, remaining, lane, s_digit, s_above);
    __syncthreads();
    prefix |= *s_digit << shift;
    remaining -= *s_above;
    mask |= 255u << shift;
    __syncthreads();                             // s_digit / s_above are rewritten by the next pass
}
