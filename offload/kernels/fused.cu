// The elementwise parts of one decode layer, one launch each (offload/kernels/fused.py): RMSNorm (optionally
// after the residual add), RoPE of q and k, silu(gate) * up. At decode every torch op of these is its own kernel
// of a few microseconds on a few KB, so the step was bound by launches, not bytes (issue 16).
//
// Each kernel repeats the rounding of the torch form in offload/model/llama.py: a value torch stores in the
// model dtype between two of its launches is rounded to that dtype here too (round_to), so the fused step
// matches the unfused one up to float32 summation order and fast-math exp / rsqrt.
#include "common.cuh"
#include "wblocks.cuh"

#define FD_MAX_WARPS 32

// v rounded to T, returned as a float (what a torch tensor of dtype T holds after an op)
template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<BF16>(float v) { return __uint_as_float(wq_bf16_rn(v) << 16); }
template <> __device__ __forceinline__ float round_to<F16>(float v) {
    return ofl_half_bits((unsigned short)wq_f16_rn(v));
}
template <> __device__ __forceinline__ float round_to<F32>(float v) { return v; }

// sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total
__device__ __forceinline__ float fd_block_sum(float v, float* warp_sums) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += ofl_shfl_xor(v, m);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
    const int n_warps = blockDim.x >> 5;
    for (int i = 0; i < n_warps; ++i) total += warp_sums[i];   // same order in every thread: one total
    return total;
}

// One block per row of x [R, H]. res == nullptr: out = w * round(x * r). Otherwise s = round(x + res) goes to
// sum [R, H] and out = w * round(s * r). r = rsqrt(mean(s^2) + eps), statistics in float32.
template <typename T>
__global__ void rms_norm_kernel(const void* x, const void* __restrict__ res, void* sum,   // sum: reread below
                                const void* __restrict__ w, void* __restrict__ out, int H, float eps)
{
    __shared__ float warp_sums[FD_MAX_WARPS];
    const long long base = (long long)blockIdx.x * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = load_scalar<T>(x, base + i);
        if (res != nullptr) {
            v = round_to<T>(v + load_scalar<T>(res, base + i));
            store1<T>(sum, base + i, v);
        }
        ss += v * v;
    }
    const float r = rsqrtf(fd_block_sum(ss, warp_sums) / (float)H + eps);
    const void* s = res != nullptr ? (const void*)sum : x;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {   // the same i as above: a thread rereads its own writes
        store1<T>(out, base + i, load_scalar<T>(w, i) * round_to<T>(load_scalar<T>(s, base + i) * r));
    }
}

// RoPE (rotate-half) of the q and k heads of qkv [R, (Hq + 2 Hkv) * D] -> q [Hq, R, D], k [Hkv, R, D]; cos_t,
// sin_t [R, D]. With a = x[j], b = x[j + D/2]:  out[j] = a cos[j] - b sin[j],  out[j + D/2] = b cos[j + D/2] +
// a sin[j + D/2], every product rounded to T as torch's x * cos + rot * sin stores it.
// grid = (ceil((Hq + Hkv) * D/2 / threads), R): one thread per (head, pair).
template <typename T>
__global__ void rope_qk_kernel(const void* __restrict__ qkv, const void* __restrict__ cos_t, const void* __restrict__ sin_t,
                               void* __restrict__ q, void* __restrict__ k, int hq, int hkv, int D)
{
    const int half = D >> 1;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (hq + hkv) * half) return;
    const int t = blockIdx.y, rows = gridDim.y;
    const int h = idx / half, j = idx - h * half;
    const long long src = (long long)t * (hq + 2 * hkv) * D + (long long)h * D;   // q heads, then k heads
    const long long cs = (long long)t * D;
    const float a = load_scalar<T>(qkv, src + j), b = load_scalar<T>(qkv, src + j + half);
    const float c0 = load_scalar<T>(cos_t, cs + j), c1 = load_scalar<T>(cos_t, cs + j + half);
    const float s0 = load_scalar<T>(sin_t, cs + j), s1 = load_scalar<T>(sin_t, cs + j + half);
    const float lo = round_to<T>(a * c0) + round_to<T>(-b * s0);
    const float hi = round_to<T>(b * c1) + round_to<T>(a * s1);
    void* dst = h < hq ? q : k;
    const long long o = ((long long)(h < hq ? h : h - hq) * rows + t) * D;
    store1<T>(dst, o + j, lo);
    store1<T>(dst, o + j + half, hi);
}

// gate_up [R, 2I] (gate | up) -> out [R, I] = round(silu(gate)) * up, silu in float32. One thread per output.
template <typename T>
__global__ void silu_mul_kernel(const void* __restrict__ gate_up, void* __restrict__ out, int I, long long n)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const long long t = idx / I, i = idx - t * I;
    const float g = load_scalar<T>(gate_up, 2 * t * I + i);
    const float u = load_scalar<T>(gate_up, 2 * t * I + I + i);
    store1<T>(out, idx, round_to<T>(g / (1.f + expf(-g))) * u);
}

// One token's k and v [Hkv, D] (head h at h * src_head elements from k / v) into a cache [Hkv, S, D] (head stride
// c_head, row stride c_row, the same for kc and vc) at the row *pos, read on the device so a captured graph writes
// each replay's position. One thread per (k or v, head, channel); values are copied, not converted.
template <typename T>
__global__ void kv_append_kernel(const void* __restrict__ k, const void* __restrict__ v, long long k_head,
                                 long long v_head, void* __restrict__ kc, void* __restrict__ vc, long long c_head,
                                 long long c_row, const long long* __restrict__ pos, int hkv, int D)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= 2 * hkv * D) return;
    const int is_v = idx >= hkv * D;
    const int rest = idx - is_v * hkv * D;
    const int h = rest / D, d = rest - h * D;
    const long long dst = (long long)h * c_head + pos[0] * c_row + d;
    const float x = load_scalar<T>(is_v ? v : k, (long long)h * (is_v ? v_head : k_head) + d);
    store1<T>(is_v ? vc : kc, dst, x);
}
