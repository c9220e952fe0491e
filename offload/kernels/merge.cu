// Exact log-sum-exp merge of two partial attentions over disjoint key sets, float32.
// One launch instead of the ~10 elementwise launches of the torch form: at decode this runs once per
// layer on [Hq, D], where launch count, not bytes, is the cost.
#include "common.cuh"

extern "C" __global__ void merge_attn_kernel(
    const float* __restrict__ o1, const float* __restrict__ lse1,   // [R, D], [R]
    const float* __restrict__ o2, const float* __restrict__ lse2,   // [R, D], [R]
    float* __restrict__ o, float* __restrict__ lse,                 // [R, D], [R]
    long long rows, int d)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * d) return;
    const long long r = idx / d;
    const float a = lse1[r], b = lse2[r];
    const float mx = fmaxf(a, b);
    const float ms = mx == OFL_NEG_INF ? 0.f : mx;            // both empty: weights exp(-inf) = 0
    const float wa = expf(a - ms), wb = expf(b - ms);
    const float total = wa + wb;
    const float inv = total > 0.f ? 1.f / total : 0.f;
    o[idx] = (o1[idx] * wa + o2[idx] * wb) * inv;
    if (idx % d == 0) lse[r] = total > 0.f ? ms + logf(total) : OFL_NEG_INF;
}
