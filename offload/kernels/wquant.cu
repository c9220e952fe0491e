// Dequantize-GEMV for weights kept in GGUF block formats (offload/model/qformats.py holds the layouts):
// y[r] = sum_k W[r, k] x[k] for one token, W read once from its planes, x (T = BF16/F16/F32) from L1/L2.
// One warp per row; a lane takes "units" of 32 weights (one Q8_0/Q4_0/Q4_1 block, or 16 quant bytes of a
// K-quant super-block) u = lane, lane + 32, ...: consecutive lanes read consecutive 16-byte vectors.
// grid = ceil(R / WQ_ROWS); block = 32 * WQ_ROWS threads. Plane pointers and row strides come from the
// launcher (every plane is row-major [R, bytes per row], 16-byte aligned).
#include "common.cuh"

#ifndef WQ_ROWS
#define WQ_ROWS 4
#endif

enum { FMT_Q8_0 = 0, FMT_Q4_0 = 1, FMT_Q4_1 = 2, FMT_Q4_K = 3, FMT_Q6_K = 4 };

__device__ __forceinline__ unsigned int wq_bf16_rn(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

template <typename T> __device__ __forceinline__ void store1(void* y, long long i, float v);
template <> __device__ __forceinline__ void store1<BF16>(void* y, long long i, float v) {
    ((unsigned short*)y)[i] = (unsigned short)wq_bf16_rn(v);
}
template <> __device__ __forceinline__ void store1<F16>(void* y, long long i, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    ((unsigned short*)y)[i] = h;
}
template <> __device__ __forceinline__ void store1<F32>(void* y, long long i, float v) { ((float*)y)[i] = v; }

// 16 consecutive elements of x starting at k (a multiple of 16) as floats
template <typename T> __device__ __forceinline__ void load_x16(const void* x, long long k, float* f) {
    const uint4* p = (const uint4*)((const char*)x + k * (16 / T::VEC));
#pragma unroll
    for (int i = 0; i < 16 / T::VEC; ++i) unpack<T>(__ldg(p + i), f + i * T::VEC);
}

__device__ __forceinline__ float nib_dot(const unsigned int* w, const float* x, int shift) {
    // sum over the 16 bytes w of ((byte >> shift) & 15) * x[byte index]
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) s += (float)((w[i >> 2] >> (8 * (i & 3) + shift)) & 15u) * x[i];
    return s;
}

__device__ __forceinline__ float sum16(const float* x) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
}

// the (scale, min) pair j of a Q4_K super-block's 12 scale bytes s (6 bits each; j >= 4 split over bytes)
__device__ __forceinline__ void k_scale_min(const unsigned char* s, int j, float& sc, float& mn) {
    if (j < 4) {
        sc = (float)(s[j] & 63);
        mn = (float)(s[j + 4] & 63);
    } else {
        sc = (float)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// one unit u of row r: its contribution to y[r]
template <typename T, int FMT>
__device__ __forceinline__ float unit_dot(const unsigned char* p0, const unsigned char* p1, const unsigned char* p2,
                                          const unsigned char* p3, long long r, int K, int u, const void* x) {
    float xa[16], xb[16];
    if (FMT == FMT_Q8_0) {            // p0 qs int8 [R, K], p1 d f16 [R, K/32]
        const uint4* q = (const uint4*)(p0 + r * K + u * 32);
        const uint4 qa = __ldg(q), qb = __ldg(q + 1);
        const float d = ofl_half_bits(__ldg((const unsigned short*)(p1 + r * (K / 16)) + u));
        load_x16<T>(x, (long long)u * 32, xa);
        load_x16<T>(x, (long long)u * 32 + 16, xb);
        const unsigned int w[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) s += (float)(signed char)(w[i >> 2] >> (8 * (i & 3))) * xa[i];
#pragma unroll
        for (int i = 0; i < 16; ++i) s += (float)(signed char)(w[4 + (i >> 2)] >> (8 * (i & 3))) * xb[i];
        return d * s;
    } else if (FMT == FMT_Q4_0 || FMT == FMT_Q4_1) {   // p0 qs [R, K/2]; p1 d [R, K/32] or dm [R, K/32 * 2]
        const uint4 qa = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const unsigned int w[4] = {qa.x, qa.y, qa.z, qa.w};
        load_x16<T>(x, (long long)u * 32, xa);
        load_x16<T>(x, (long long)u * 32 + 16, xb);
        const float s = nib_dot(w, xa, 0) + nib_dot(w, xb, 4);
        if (FMT == FMT_Q4_0) {
            const float d = ofl_half_bits(__ldg((const unsigned short*)(p1 + r * (K / 16)) + u));
            return d * (s - 8.f * (sum16(xa) + sum16(xb)));
        }
        const unsigned int dm = __ldg((const unsigned int*)(p1 + r * (K / 8)) + u);
        return ofl_half_bits((unsigned short)(dm & 0xffffu)) * s
             + ofl_half_bits((unsigned short)(dm >> 16)) * (sum16(xa) + sum16(xb));
    } else if (FMT == FMT_Q4_K) {     // p0 qs [R, K/2]; p1 meta [R, K/256 * 16]: d, dmin, 12 scale bytes
        const int sb = u >> 3, b = (u & 7) * 16, c = b >> 5, o = b & 31;
        const uint4 qa = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const uint4 mt = __ldg((const uint4*)(p1 + r * (K / 16) + sb * 16));
        const unsigned int w[4] = {qa.x, qa.y, qa.z, qa.w};
        const unsigned int m3[3] = {mt.y, mt.z, mt.w};
        const unsigned char* s = (const unsigned char*)m3;
        const long long k0 = (long long)sb * 256 + c * 64 + o;
        load_x16<T>(x, k0, xa);
        load_x16<T>(x, k0 + 32, xb);
        float sc0, mn0, sc1, mn1;
        k_scale_min(s, 2 * c, sc0, mn0);
        k_scale_min(s, 2 * c + 1, sc1, mn1);
        const float d = ofl_half_bits((unsigned short)(mt.x & 0xffffu)), dmin = ofl_half_bits((unsigned short)(mt.x >> 16));
        return d * (sc0 * nib_dot(w, xa, 0) + sc1 * nib_dot(w, xb, 4)) - dmin * (mn0 * sum16(xa) + mn1 * sum16(xb));
    } else {                          // Q6_K: p0 ql [R, K/2], p1 qh [R, K/4], p2 sc int8 [R, K/16], p3 d [R, K/256 * 2]
        const int sb = u >> 3, b = (u & 7) * 16, h = b >> 6, o = b & 63;
        const uint4 la = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const uint4 ha = __ldg((const uint4*)(p1 + r * (K / 4) + sb * 64 + h * 32 + (o & 31)));
        const unsigned int wl[4] = {la.x, la.y, la.z, la.w}, wh[4] = {ha.x, ha.y, ha.z, ha.w};
        const long long k0 = (long long)sb * 256 + h * 128 + o;
        load_x16<T>(x, k0, xa);
        load_x16<T>(x, k0 + 64, xb);
        const int sl = 2 * (o >> 5), sh = sl + 4;
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const unsigned int lb = wl[i >> 2] >> (8 * (i & 3)), hb = wh[i >> 2] >> (8 * (i & 3));
            s0 += (float)((int)((lb & 15u) | (((hb >> sl) & 3u) << 4)) - 32) * xa[i];
            s1 += (float)((int)(((lb >> 4) & 15u) | (((hb >> sh) & 3u) << 4)) - 32) * xb[i];
        }
        const signed char* sc = (const signed char*)(p2 + r * (K / 16) + sb * 16 + h * 8 + (o >> 4));
        const float d = ofl_half_bits(__ldg((const unsigned short*)(p3 + r * (K / 128)) + sb));
        return d * ((float)__ldg(sc) * s0 + (float)__ldg(sc + 4) * s1);
    }
}

// y[r] for rows r < R (the launcher offsets y for each part of a fused matrix)
template <typename T, int FMT>
__global__ void __launch_bounds__(32 * WQ_ROWS) gemv_kernel(
        const unsigned char* __restrict__ p0, const unsigned char* __restrict__ p1,
        const unsigned char* __restrict__ p2, const unsigned char* __restrict__ p3,
        const void* __restrict__ x, void* __restrict__ y, int R, int K) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * WQ_ROWS + (threadIdx.x >> 5);
    if (r >= R) return;
    const int units = K / 32;
    float acc = 0.f;
#pragma unroll 4
    for (int u = lane; u < units; u += 32) acc += unit_dot<T, FMT>(p0, p1, p2, p3, r, K, u, x);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) acc += ofl_shfl_xor(acc, m);
    if (lane == 0) store1<T>(y, r, acc);
}
