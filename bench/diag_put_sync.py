"""Diagnostic: does TieredKVStore.put block the host on the copy stream? (sync debug mode shows where)."""
import time, traceback, warnings
import torch
from offload.tiers import ChunkShape, TieredKVStore

SHAPE = ChunkShape(8, 64, 128, torch.bfloat16)
store = TieredKVStore(SHAPE, 2, (4096, 8192, 0), "cuda", policy="lru", window_chunks=4)
kv = torch.randn(4096, *SHAPE.shape, device="cuda").to(SHAPE.dtype)
store.put(0, 0, kv, wait_kv=False)
kv2 = torch.randn(4096, *SHAPE.shape, device="cuda").to(SHAPE.dtype)
torch.cuda.synchronize()
print("host slab is_pinned:", store.tiers[1].slab.is_pinned(), store.tiers[1].pin_method)
with torch.cuda.stream(store._copy):
    torch.cuda._sleep(2_000_000_000)
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    orig = warnings.showwarning
    t = time.perf_counter()
    store.put(1, 0, kv2, wait_kv=False)
    print("put took %.1f ms" % (1000 * (time.perf_counter() - t)))
torch.cuda.set_sync_debug_mode(0)
for w in caught[:5]:
    print("SYNC:", str(w.message)[:200], w.filename, w.lineno)
# locate with an error instead, to get the stack
torch.cuda.synchronize()
with torch.cuda.stream(store._copy):
    torch.cuda._sleep(200_000_000)
torch.cuda.set_sync_debug_mode("error")
try:
    store.put(1, 100, kv2[:100], wait_kv=False)
    print("second put: no sync")
except RuntimeError:
    traceback.print_exc(limit=12)
torch.cuda.set_sync_debug_mode(0)
