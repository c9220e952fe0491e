"""Per-kernel GPU time of the token stage's select (kernels/select.cu) at the 128K shape of x8 candidates at a 2K
budget (Hkv 8, M 16,640, k 2,048): crowded ranks as on dummy weights (all within one first 8-bit digit) and spread
ranks; torch.profiler over 50 calls each. Printed, not asserted.

    python bench/select_profile.py
"""
import torch
from torch.profiler import ProfilerActivity, profile
from offload.kernels import _cupy_tokens as cp

HKV, C, KC, K = 8, 32, 520, 2048
gen = torch.Generator().manual_seed(0)
cand = torch.arange(KC).repeat(HKV, 1).cuda()                                  # cand: [Hkv, K]
slots = torch.arange(KC, dtype=torch.int32).repeat(HKV, 1).cuda()             # slots: [Hkv, K]
for name, ranks in (("crowded", (1 + 0.05 * torch.randn(HKV, KC * C, generator=gen)) * 1e-4),
                    ("spread", torch.randn(HKV, KC * C, generator=gen) * 3)):
    ranks = ranks.cuda()
    for _ in range(3):
        cp.token_select(ranks, None, None, cand, slots, C, K, True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            cp.token_select(ranks, None, None, cand, slots, C, K, True)
        torch.cuda.synchronize()
    print(name)
    for e in prof.key_averages():
        if e.device_time_total > 0:
            print(f"  {e.key[:60]:60s} {e.device_time_total / e.count:8.2f} us x {e.count}")
