// Dequantize-GEMV for weights kept in GGUF block formats (offload/model/qformats.py holds the layouts):
// y[r] = sum_k W[r, k] x[k] for one token, W read once from its planes, x (T = BF16/F16/F32) from L1/L2.
// A warp takes WQ_RPW rows; a lane takes "units" of 32 weights (one Q8_0/Q4_0/Q4_1 block, or 16 quant bytes of a
// K-quant super-block) u = lane, lane + 32, ...: consecutive lanes read consecutive 16-byte vectors.
// grid = ceil(R / (WQ_ROWS * WQ_RPW)); block = 32 * WQ_ROWS threads. Plane pointers and row strides come from the
// launcher (every plane is row-major [R, bytes per row], 16-byte aligned).
#include "common.cuh"

#ifndef WQ_ROWS
#define WQ_ROWS 4      // warps per block
#endif
#ifndef WQ_RPW
#define WQ_RPW 2       // rows per warp
#endif
#ifndef WQ_UNROLL
#define WQ_UNROLL 2    // units in flight per lane
#endif

static constexpr int wq_unroll = WQ_UNROLL;   // #pragma unroll takes a constant, not a macro

#include "wblocks.cuh"

// the 32 x values unit u multiplies: xa, xb hold 16 each (which 16 depends on the format's nibble order)
template <typename T, int FMT>
__device__ __forceinline__ void unit_x(const void* x, int u, float* xa, float* xb) {
    if (FMT == FMT_Q8_0 || FMT == FMT_Q4_0 || FMT == FMT_Q4_1) {
        load_x16<T>(x, (long long)u * 32, xa);
        load_x16<T>(x, (long long)u * 32 + 16, xb);
    } else if (FMT == FMT_Q4_K) {     // 16 quant bytes: 16 weights of sub-block 2c (low nibbles), 16 of 2c+1
        const int b = (u & 7) * 16;
        const long long k0 = (long long)(u >> 3) * 256 + (b >> 5) * 64 + (b & 31);
        load_x16<T>(x, k0, xa);
        load_x16<T>(x, k0 + 32, xb);
    } else {                          // Q6_K: 16 low-nibble bytes: weights o.. of a 128-half and o+64..
        const int b = (u & 7) * 16;
        const long long k0 = (long long)(u >> 3) * 256 + (b >> 6) * 128 + (b & 63);
        load_x16<T>(x, k0, xa);
        load_x16<T>(x, k0 + 64, xb);
    }
}

// unit u of row r dotted with its x values: the unit's contribution to y[r]
template <int FMT>
__device__ __forceinline__ float unit_dot(const unsigned char* p0, const unsigned char* p1, const unsigned char* p2,
                                          const unsigned char* p3, long long r, int K, int u,
                                          const float* xa, const float* xb, float sum_x) {
    if (FMT == FMT_Q8_0) {            // p0 qs int8 [R, K], p1 d f16 [R, K/32]
        const uint4* q = (const uint4*)(p0 + r * K + u * 32);
        const uint4 qa = __ldg(q), qb = __ldg(q + 1);
        const float d = ofl_half_bits(__ldg((const unsigned short*)(p1 + r * (K / 16)) + u));
        // int8 as b ^ 0x80 (0..255), the 128 removed by byte_f's bias
        const unsigned int ta[4] = {qa.x ^ 0x80808080u, qa.y ^ 0x80808080u, qa.z ^ 0x80808080u, qa.w ^ 0x80808080u};
        const unsigned int tb[4] = {qb.x ^ 0x80808080u, qb.y ^ 0x80808080u, qb.z ^ 0x80808080u, qb.w ^ 0x80808080u};
        return d * (byte_dot(ta, xa, 128.f) + byte_dot(tb, xb, 128.f));
    } else if (FMT == FMT_Q4_0 || FMT == FMT_Q4_1) {   // p0 qs [R, K/2]; p1 d [R, K/32] or dm [R, K/32 * 2]
        const uint4 qa = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const unsigned int w[4] = {qa.x, qa.y, qa.z, qa.w};
        const float s = nib_dot(w, xa, 0) + nib_dot(w, xb, 4);
        if (FMT == FMT_Q4_0) {
            const float d = ofl_half_bits(__ldg((const unsigned short*)(p1 + r * (K / 16)) + u));
            return d * (s - 8.f * sum_x);
        }
        const unsigned int dm = __ldg((const unsigned int*)(p1 + r * (K / 8)) + u);
        return ofl_half_bits((unsigned short)(dm & 0xffffu)) * s + ofl_half_bits((unsigned short)(dm >> 16)) * sum_x;
    } else if (FMT == FMT_Q4_K) {     // p0 qs [R, K/2]; p1 meta [R, K/256 * 16]: d, dmin, 12 scale bytes
        const int sb = u >> 3, c = ((u & 7) * 16) >> 5;
        const uint4 qa = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const uint4 mt = __ldg((const uint4*)(p1 + r * (K / 16) + sb * 16));
        const unsigned int w[4] = {qa.x, qa.y, qa.z, qa.w};
        float sc0, mn0, sc1, mn1;
        k_scale_min(mt.y, mt.z, mt.w, 2 * c, sc0, mn0);
        k_scale_min(mt.y, mt.z, mt.w, 2 * c + 1, sc1, mn1);
        const float d = ofl_half_bits((unsigned short)(mt.x & 0xffffu)), dmin = ofl_half_bits((unsigned short)(mt.x >> 16));
        return d * (sc0 * nib_dot(w, xa, 0) + sc1 * nib_dot(w, xb, 4)) - dmin * (mn0 * xa[16] + mn1 * xb[16]);
    } else {                          // Q6_K: p0 ql [R, K/2], p1 qh [R, K/4], p2 sc int8 [R, K/16], p3 d [R, K/256 * 2]
        const int sb = u >> 3, b = (u & 7) * 16, h = b >> 6, o = b & 63;
        const uint4 la = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const uint4 ha = __ldg((const uint4*)(p1 + r * (K / 4) + sb * 64 + h * 32 + (o & 31)));
        const unsigned int wl[4] = {la.x, la.y, la.z, la.w}, wh[4] = {ha.x, ha.y, ha.z, ha.w};
        const int sl = 2 * (o >> 5), sh = sl + 4;
        unsigned int q0[4], q1[4];    // four 6-bit weights per word, one per byte
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            q0[j] = (wl[j] & 0x0F0F0F0Fu) | (((wh[j] >> sl) & 0x03030303u) << 4);
            q1[j] = ((wl[j] >> 4) & 0x0F0F0F0Fu) | (((wh[j] >> sh) & 0x03030303u) << 4);
        }
        const signed char* sc = (const signed char*)(p2 + r * (K / 16) + sb * 16 + h * 8 + (o >> 4));
        const float d = ofl_half_bits(__ldg((const unsigned short*)(p3 + r * (K / 128)) + sb));
        return d * ((float)__ldg(sc) * byte_dot(q0, xa, 32.f) + (float)__ldg(sc + 4) * byte_dot(q1, xb, 32.f));
    }
}

// y[r] for rows r < R (the launcher offsets y for each part of a fused matrix). Each warp takes WQ_RPW
// consecutive rows, so the x values a lane loads for a unit serve WQ_RPW rows.
template <typename T, int FMT>
__global__ void __launch_bounds__(32 * WQ_ROWS) gemv_kernel(
        const unsigned char* __restrict__ p0, const unsigned char* __restrict__ p1,
        const unsigned char* __restrict__ p2, const unsigned char* __restrict__ p3,
        const void* __restrict__ x, void* __restrict__ y, int R, int K) {
    const int lane = threadIdx.x & 31;
    const long long r0 = ((long long)blockIdx.x * WQ_ROWS + (threadIdx.x >> 5)) * WQ_RPW;
    if (r0 >= R) return;
    const int units = K / 32;
    float acc[WQ_RPW];
#pragma unroll
    for (int j = 0; j < WQ_RPW; ++j) acc[j] = 0.f;
#pragma unroll wq_unroll
    for (int u = lane; u < units; u += 32) {
        float xa[17], xb[17];          // [16]: the sum of the 16 (offset and min terms), once for all rows
        unit_x<T, FMT>(x, u, xa, xb);
        xa[16] = sum16(xa);
        xb[16] = sum16(xb);
#pragma unroll
        for (int j = 0; j < WQ_RPW; ++j)
            if (r0 + j < R) acc[j] += unit_dot<FMT>(p0, p1, p2, p3, r0 + j, K, u, xa, xb, xa[16] + xb[16]);
    }
#pragma unroll
    for (int j = 0; j < WQ_RPW; ++j) {
        float a = acc[j];
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) a += ofl_shfl_xor(a, m);
        if (lane == 0 && r0 + j < R) store1<T>(y, r0 + j, a);
    }
}

// ---- dequantize to a dense matrix (prefill: a layer's weights into the bf16 scratch cuBLAS reads) ----------
// wa, wb: the unit's 32 weights at the positions unit_x gives (ka = first of wa, kb = first of wb)
template <int FMT>
__device__ __forceinline__ void unit_weights(const unsigned char* p0, const unsigned char* p1, const unsigned char* p2,
                                             const unsigned char* p3, long long r, int K, int u, float* wa, float* wb,
                                             int& ka, int& kb) {
    if (FMT == FMT_Q8_0) {
        const uint4* q = (const uint4*)(p0 + r * K + u * 32);
        const uint4 qa = __ldg(q), qb = __ldg(q + 1);
        const float d = ofl_half_bits(__ldg((const unsigned short*)(p1 + r * (K / 16)) + u));
        const unsigned int w[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            wa[i] = (float)(signed char)(w[i >> 2] >> (8 * (i & 3))) * d;
            wb[i] = (float)(signed char)(w[4 + (i >> 2)] >> (8 * (i & 3))) * d;
        }
        ka = u * 32; kb = ka + 16;
    } else if (FMT == FMT_Q4_0 || FMT == FMT_Q4_1) {
        const uint4 qa = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const unsigned int w[4] = {qa.x, qa.y, qa.z, qa.w};
        float d, m;
        if (FMT == FMT_Q4_0) {
            d = ofl_half_bits(__ldg((const unsigned short*)(p1 + r * (K / 16)) + u));
            m = 0.f;
        } else {
            const unsigned int dm = __ldg((const unsigned int*)(p1 + r * (K / 8)) + u);
            d = ofl_half_bits((unsigned short)(dm & 0xffffu));
            m = ofl_half_bits((unsigned short)(dm >> 16));
        }
        const float off = FMT == FMT_Q4_0 ? 8.f : 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const unsigned int b = w[i >> 2] >> (8 * (i & 3));
            wa[i] = d * ((float)(b & 15u) - off) + m;
            wb[i] = d * ((float)((b >> 4) & 15u) - off) + m;
        }
        ka = u * 32; kb = ka + 16;
    } else if (FMT == FMT_Q4_K) {
        const int sb = u >> 3, b = (u & 7) * 16, c = b >> 5;
        const uint4 qa = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const uint4 mt = __ldg((const uint4*)(p1 + r * (K / 16) + sb * 16));
        const unsigned int w[4] = {qa.x, qa.y, qa.z, qa.w};
        float sc0, mn0, sc1, mn1;
        k_scale_min(mt.y, mt.z, mt.w, 2 * c, sc0, mn0);
        k_scale_min(mt.y, mt.z, mt.w, 2 * c + 1, sc1, mn1);
        const float d = ofl_half_bits((unsigned short)(mt.x & 0xffffu)), dmin = ofl_half_bits((unsigned short)(mt.x >> 16));
        const float s0 = d * sc0, m0 = dmin * mn0, s1 = d * sc1, m1 = dmin * mn1;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const unsigned int q = w[i >> 2] >> (8 * (i & 3));
            wa[i] = s0 * (float)(q & 15u) - m0;
            wb[i] = s1 * (float)((q >> 4) & 15u) - m1;
        }
        ka = sb * 256 + c * 64 + (b & 31); kb = ka + 32;
    } else {
        const int sb = u >> 3, b = (u & 7) * 16, h = b >> 6, o = b & 63;
        const uint4 la = __ldg((const uint4*)(p0 + r * (K / 2) + u * 16));
        const uint4 ha = __ldg((const uint4*)(p1 + r * (K / 4) + sb * 64 + h * 32 + (o & 31)));
        const unsigned int wl[4] = {la.x, la.y, la.z, la.w}, wh[4] = {ha.x, ha.y, ha.z, ha.w};
        const int sl = 2 * (o >> 5), sh = sl + 4;
        const signed char* sc = (const signed char*)(p2 + r * (K / 16) + sb * 16 + h * 8 + (o >> 4));
        const float d = ofl_half_bits(__ldg((const unsigned short*)(p3 + r * (K / 128)) + sb));
        const float s0 = d * (float)__ldg(sc), s1 = d * (float)__ldg(sc + 4);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const unsigned int lb = wl[i >> 2] >> (8 * (i & 3)), hb = wh[i >> 2] >> (8 * (i & 3));
            wa[i] = s0 * (float)((int)((lb & 15u) | (((hb >> sl) & 3u) << 4)) - 32);
            wb[i] = s1 * (float)((int)(((lb >> 4) & 15u) | (((hb >> sh) & 3u) << 4)) - 32);
        }
        ka = sb * 256 + h * 128 + o; kb = ka + 64;
    }
}

// 16 values to out[i .. i+15] (i a multiple of 16: 16-byte aligned) in 16-byte stores
template <typename T> __device__ __forceinline__ void store16(void* out, long long i, const float* f);
template <> __device__ __forceinline__ void store16<BF16>(void* out, long long i, const float* f) {
    unsigned int w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = wq_bf16_rn(f[2 * k]) | (wq_bf16_rn(f[2 * k + 1]) << 16);
    uint4* p = (uint4*)((unsigned short*)out + i);
    p[0] = make_uint4(w[0], w[1], w[2], w[3]);
    p[1] = make_uint4(w[4], w[5], w[6], w[7]);
}
template <> __device__ __forceinline__ void store16<F16>(void* out, long long i, const float* f) {
    unsigned int w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = wq_f16_rn(f[2 * k]) | (wq_f16_rn(f[2 * k + 1]) << 16);
    uint4* p = (uint4*)((unsigned short*)out + i);
    p[0] = make_uint4(w[0], w[1], w[2], w[3]);
    p[1] = make_uint4(w[4], w[5], w[6], w[7]);
}
template <> __device__ __forceinline__ void store16<F32>(void* out, long long i, const float* f) {
    uint4* p = (uint4*)((float*)out + i);
#pragma unroll
    for (int k = 0; k < 4; ++k)
        p[k] = make_uint4(__float_as_uint(f[4 * k]), __float_as_uint(f[4 * k + 1]), __float_as_uint(f[4 * k + 2]),
                          __float_as_uint(f[4 * k + 3]));
}

// out[r, :] (T, row-major [R, K]) = the dequantized rows; one thread per unit, grid-stride over R * K/32 units
template <typename T, int FMT>
__global__ void dequant_kernel(const unsigned char* __restrict__ p0, const unsigned char* __restrict__ p1,
                               const unsigned char* __restrict__ p2, const unsigned char* __restrict__ p3,
                               void* __restrict__ out, int R, int K) {
    const long long units = (long long)R * (K / 32);
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < units; t += (long long)gridDim.x * blockDim.x) {
        const long long r = t / (K / 32);
        const int u = (int)(t - r * (K / 32));
        float wa[16], wb[16];
        int ka, kb;
        unit_weights<FMT>(p0, p1, p2, p3, r, K, u, wa, wb, ka, kb);
        store16<T>(out, r * K + ka, wa);
        store16<T>(out, r * K + kb, wb);
    }
}
