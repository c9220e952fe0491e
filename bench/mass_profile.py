"""Per-kernel GPU time of the token mass cut (kernels/mass.cu) and of the select's rank kernel with and without the
mass total, at the 128K shape of x8 candidates at a 2K budget (Hkv 8, G 4, M 16,640, k 2,048, p 0.97, floor 64):
"crowded" logits as on dummy weights (every head keeps the cap: the cut is one pass over the picks) and "peaked"
logits (a few hundred picks reach p: the radix select runs). torch.profiler over 50 calls each. Printed, not
asserted. With --old FILE (a copy of an earlier mass.cu), its mass_keep_kernel is timed on the same inputs.

    python bench/mass_profile.py [--old path/to/old_mass.cu]
"""
import argparse
import os
import shutil

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from offload.kernels import _build, _cupy_tokens as cp
from offload.kernels._cupy import _launch, _ptr
from offload.kernels.reference import mass_keep, mass_need

HKV, G, C, KC, K, P, FLOOR = 8, 4, 32, 520, 2048, 0.97, 64


def inputs(spread: float, gen):
    logits = (torch.randn(HKV, G, KC * C, generator=gen) * spread).cuda()      # logits: [Hkv, G, M]
    mx = logits.amax(-1, keepdim=True)                                         # mx: [Hkv, G, 1]
    parts = torch.cat([mx, (logits - mx).exp().sum(-1, keepdim=True)], -1)[:, None]   # parts: [Hkv, 1, G, 2]
    cand = torch.arange(KC).repeat(HKV, 1).cuda()                              # cand: [Hkv, K]
    slots = torch.arange(KC, dtype=torch.int32).repeat(HKV, 1).cuda()          # slots: [Hkv, K]
    base = torch.full((HKV * G,), -4.0, device="cuda")                         # base: [Hq]
    return logits, parts.contiguous(), base, cand, slots


def old_mass_keep(fn, val, ok, row, total):
    _launch(fn, val.device, (HKV,), (_ptr(val), _ptr(total), np.int32(K), np.int32(G), np.int64(mass_need(P, G)),
                                     np.int32(FLOOR), _ptr(ok), _ptr(row), _ptr(None)), threads=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="an earlier mass.cu to time against")
    args = ap.parse_args()
    old = None
    if args.old:
        here = os.path.dirname(_build.__file__)
        shutil.copy(args.old, os.path.join(here, "_mass_old.cu"))
        old = _build.function("_mass_old.cu", "mass_keep_kernel", 0)
    gen = torch.Generator().manual_seed(0)
    for name, spread in (("crowded", 0.05), ("peaked", 4.0)):
        logits, parts, base, cand, slots = inputs(spread, gen)
        idx, val, ok, row, total = cp.token_select(logits, parts, base, cand, slots, C, K, True, total=True)
        want = mass_keep(idx, val, ok, total, G, P, FLOOR)
        got = ok.clone()
        cp.mass_keep(val, got, row.clone(), total, G, P, FLOOR)
        print(f"{name}: kept per head {want.sum(1).tolist()} of {ok.sum(1).tolist()}; "
              f"kernel == reference: {torch.equal(got, want)}")
        runs = [("select total=False", lambda: cp.token_select(logits, parts, base, cand, slots, C, K, True)),
                ("select total=True", lambda: cp.token_select(logits, parts, base, cand, slots, C, K, True,
                                                              total=True)),
                ("mass_keep radix", lambda: cp.mass_keep(val, ok.clone(), row.clone(), total, G, P, FLOOR))]
        if old is not None:
            runs.append(("mass_keep bitonic (old)", lambda: old_mass_keep(old, val, ok.clone(), row.clone(), total)))
        for label, fn in runs:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
            print(f"  {label}")
            for e in prof.key_averages():
                if e.device_time_total > 0 and ("select" in e.key or "mass" in e.key):
                    print(f"    {e.key[:56]:56s} {e.device_time_total / e.count:8.2f} us x {e.count}")


if __name__ == "__main__":
    main()
