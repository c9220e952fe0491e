// Single K or V rows copied out of chunk pools, for the token-level selection stage.
//
// out[h, r] = pool[slot, which, h, off] where p = rows[h, r] is a position in the concatenation of head
// h's slot list (slot = slots[h, p >> c_shift], off = p & (C - 1)); rows == nullptr means p = r. Slots
// flagged OFL_ALT_SLOT are read from `alt` (the pinned host slab, over PCIe under UVA), so candidate keys
// held by the GPU pool and the host slab are gathered in one launch without a host round trip. A row
// whose position is < 0 or past the list, or whose slot is -1, is written as zeros (the caller masks it).
// grid = (ceil(R * vecs_per_row / 256), Hkv); one thread per 16-byte vector of a row.
#include "common.cuh"

extern "C" __global__ void gather_rows_kernel(const uint4* __restrict__ pool, const uint4* __restrict__ alt,
                                              const int* __restrict__ slots, int n_slots,
                                              const long long* __restrict__ rows, int n_rows, int hkv,
                                              int c_shift, int vecs_per_row, int which, uint4* __restrict__ out) {
    const int h = blockIdx.y;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * vecs_per_row) return;
    const int r = (int)(t / vecs_per_row);
    const int v = (int)(t - (long long)r * vecs_per_row);
    const long long p = rows != nullptr ? rows[(long long)h * n_rows + r] : (long long)r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (p >= 0 && (p >> c_shift) < n_slots) {
        int s = slots[(long long)h * n_slots + (p >> c_shift)];
        const uint4* src = (s & OFL_ALT_SLOT) ? alt : pool;
        if (s >= 0 && src != nullptr) {   // a flagged slot with no (or an empty) alt pool is padding
            s &= ~OFL_ALT_SLOT;
            const long long off = p & ((1LL << c_shift) - 1);
            const long long row = ((((long long)s * 2 + which) * hkv + h) << c_shift) + off;
            val = src[row * vecs_per_row + v];
        }
    }
    out[((long long)h * n_rows + r) * vecs_per_row + v] = val;
}
