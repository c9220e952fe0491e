"""The host tier: ONE pre-sized slab of host RAM, pinned when CUDA is available, cut into chunk slots.

Why not `torch.empty(..., pin_memory=True)`: torch's caching host allocator rounds every pinned block up
to a power of two, so a 40 GiB slab would take 64 GiB. Instead the slab is an anonymous mmap (page
aligned, which O_DIRECT disk I/O straight from the slab needs, and transparent huge pages where the
kernel allows), faulted in once by a parallel zero fill, then page-locked in place with
cudaHostRegister(portable | mapped). Pinned memory is readable by GPU kernels through UVA at the
same address, so attention can read host chunks without staging them (`slab` is that tensor).
If registering fails (RLIMIT_MEMLOCK, a driver without it), the slab falls back to torch's pinned
allocator and says so in `pin_method`.
"""
from __future__ import annotations

import mmap
import weakref

import torch

from offload.errors import CapacityError
from offload.tiers.base import ChunkShape
from offload.tiers.device import TensorTier

_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2   # cudaHostRegisterPortable | cudaHostRegisterMapped


# Slabs whose unpinning waits for a CUDA graph capture to end: (address, the mmap kept mapped until then)
_DEFERRED: list[tuple[int, object]] = []


def _capturing() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001  (interpreter shutdown)
        return False


def _unregister(ptr: int, buf: object = None) -> None:
    """Unpin a slab. A pool dropped by the garbage collector in the middle of a decode step's capture (a closed
    session's, collected at any allocation) must not call cudaHostUnregister there: that call invalidates the
    capture, the step falls back to piecewise graphs. It waits in _DEFERRED, its mmap still mapped."""
    if _capturing():
        _DEFERRED.append((ptr, buf))
        return
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001  (interpreter shutdown: the driver may already be gone)
        pass


def unregister_deferred() -> int:
    """Unpin the slabs dropped during a capture (call when it has ended) -> how many."""
    n = 0
    while _DEFERRED and not _capturing():
        ptr, _ = _DEFERRED.pop()
        _unregister(ptr)
        n += 1
    return n


def _mmap_slab(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)   # fewer TLB misses and faster pinning of a large slab
        except OSError:
            pass
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
    return buf, raw                                                            # raw: [nbytes] uint8


class HostPool(TensorTier):
    """Tier "host": chunk slots in one host slab [S, 2, Hkv, C, D], pinned iff `pin` (default: CUDA available)."""

    name = "host"

    def __init__(self, shape: ChunkShape, capacity: int, pin: bool | None = None):
        self.shape = shape
        self.capacity = capacity
        pin = torch.cuda.is_available() if pin is None else pin
        nbytes = capacity * shape.nbytes
        try:
            self._buf, raw = _mmap_slab(nbytes)
        except (OSError, MemoryError, ValueError):
            raise CapacityError(f"cannot reserve {nbytes / 2**30:.1f} GiB of host RAM for the host tier; "
                                "lower --host-mem or --ctx") from None
        raw.zero_()   # touches every page now (in parallel), not in the middle of a decode step
        self.pin_method = "none"
        if pin and nbytes:
            res = int(torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), nbytes, _CUDA_HOST_REGISTER_PORTABLE_MAPPED))
            if res == 0:
                self.pin_method = "cudaHostRegister"
                self._finalizer = weakref.finalize(self, _unregister, raw.data_ptr(), self._buf)
            else:
                # fallback: torch's pinned allocator (rounds up to a power of two, still correct)
                del raw
                self._buf = None
                raw = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)    # raw: [nbytes] uint8
                self.pin_method = f"torch pin_memory (cudaHostRegister error {res})"
        self.slab = raw.view(shape.dtype).view(capacity, *shape.shape)         # slab: [S, 2, Hkv, C, D]
        super().__init__(shape, self.slab)

    @property
    def is_pinned(self) -> bool:
        return self.pin_method != "none"

    def close(self) -> None:
        """Unpin now (the memory itself goes when the last view of the slab does)."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
