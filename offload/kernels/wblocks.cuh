// Shared by the weight-block kernels (wquant.cu, wgemv.cu): the GGUF formats' codes, float conversions without
// int-to-float instructions, and the per-format scale decoding. Pasted in place of its include line, like common.cuh.

enum { FMT_Q8_0 = 0, FMT_Q4_0 = 1, FMT_Q4_1 = 2, FMT_Q4_K = 3, FMT_Q6_K = 4 };

__device__ __forceinline__ unsigned int wq_bf16_rn(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

template <typename T> __device__ __forceinline__ void store1(void* y, long long i, float v);
template <> __device__ __forceinline__ void store1<BF16>(void* y, long long i, float v) {
    ((unsigned short*)y)[i] = (unsigned short)wq_bf16_rn(v);
}
__device__ __forceinline__ unsigned int wq_f16_rn(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ void store1<F16>(void* y, long long i, float v) {
    ((unsigned short*)y)[i] = (unsigned short)wq_f16_rn(v);
}
template <> __device__ __forceinline__ void store1<F32>(void* y, long long i, float v) { ((float*)y)[i] = v; }

// 16 consecutive elements of x starting at k (a multiple of 16) as floats
template <typename T> __device__ __forceinline__ void load_x16(const void* x, long long k, float* f) {
    const uint4* p = (const uint4*)((const char*)x + k * (16 / T::VEC));
#pragma unroll
    for (int i = 0; i < 16 / T::VEC; ++i) unpack<T>(__ldg(p + i), f + i * T::VEC);
}

// Byte k of w as an exact float, without an int-to-float conversion (a quarter-rate instruction that bound
// the first version of these kernels): PRMT puts the byte under the exponent of 2^23, one FADD removes it.
// `bias` is subtracted too (128 for int8 stored as b ^ 0x80, 32 for Q6_K's offset).
__device__ __forceinline__ float byte_f(unsigned int w, int k, float bias) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650u | (unsigned int)k)) - (8388608.0f + bias);
}

// sum over 16 weights held one per byte in q[0..3] (already masked to their bits) of (q - bias) * x
__device__ __forceinline__ float byte_dot(const unsigned int* q, const float* x, float bias) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) s += byte_f(q[i >> 2], i & 3, bias) * x[i];
    return s;
}

__device__ __forceinline__ float nib_dot(const unsigned int* w, const float* x, int shift) {
    // sum over the 16 bytes w of ((byte >> shift) & 15) * x[byte index]
    const unsigned int q[4] = {(w[0] >> shift) & 0x0F0F0F0Fu, (w[1] >> shift) & 0x0F0F0F0Fu,
                               (w[2] >> shift) & 0x0F0F0F0Fu, (w[3] >> shift) & 0x0F0F0F0Fu};
    return byte_dot(q, x, 0.f);
}

__device__ __forceinline__ float sum16(const float* x) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
}

// byte k (0..11) of a Q4_K super-block's scale bytes, held in three words (kept in registers: no local array)
__device__ __forceinline__ unsigned int k_byte(unsigned int w0, unsigned int w1, unsigned int w2, int k) {
    const unsigned int w = k < 4 ? w0 : (k < 8 ? w1 : w2);
    return (w >> (8 * (k & 3))) & 255u;
}

// the (scale, min) pair j of a Q4_K super-block (6 bits each; pairs j >= 4 are split over three bytes)
__device__ __forceinline__ void k_scale_min(unsigned int w0, unsigned int w1, unsigned int w2, int j,
                                            float& sc, float& mn) {
    if (j < 4) {
        sc = (float)(k_byte(w0, w1, w2, j) & 63u);
        mn = (float)(k_byte(w0, w1, w2, j + 4) & 63u);
    } else {
        const unsigned int mix = k_byte(w0, w1, w2, j + 4);
        sc = (float)((mix & 15u) | ((k_byte(w0, w1, w2, j - 4) >> 6) << 4));
        mn = (float)((mix >> 4) | ((k_byte(w0, w1, w2, j) >> 6) << 4));
    }
}

