"""The compute-device tier: one tensor [S, 2, Hkv, C, D] on the GPU (a CPU tensor on a CPU-only machine).

Copy rules shared with the host pool live here too: copies go run by run (consecutive slots move in
one copy), on the caller's stream, and return an event recorded after them. A copy is asynchronous
only when its host side is pinned; a pageable host side makes torch copy synchronously, which is
correct but slow, never racy.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from offload.tiers.base import ChunkShape
from offload.tiers.slots import SlotAllocator, runs

_INDEX_COPY_MIN_RUNS = 8   # past this many runs, one index kernel beats many small copies on one device


def _check(what: str, t: torch.Tensor, n: int, shape: ChunkShape) -> None:
    if tuple(t.shape) != (n, *shape.shape) or t.dtype != shape.dtype:
        raise ValueError(f"{what} must be [{n}, {', '.join(map(str, shape.shape))}] {shape.dtype}, "
                         f"got {list(t.shape)} {t.dtype}")


def _is_async(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A copy between a and b may be non_blocking: both on the GPU, or the host side pinned."""
    if a.is_cuda and b.is_cuda:
        return True
    host = b if a.is_cuda else a
    return (a.is_cuda or b.is_cuda) and host.is_pinned()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a stream sync: a blocking copy from pageable memory would
    wait for all work queued on the stream; a pinned source lets the copy queue like any kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _stream_scope(cuda_device: torch.device | None, stream):
    """(context, stream, caller's stream) for the copies: the given stream, else the current one."""
    if cuda_device is None:
        return contextlib.nullcontext(), None, None
    caller = torch.cuda.current_stream(cuda_device)
    stream = stream if stream is not None else caller
    return torch.cuda.stream(stream), stream, caller


def _finish(stream, caller, *tensors: torch.Tensor):
    """Keep caller tensors alive for a side stream and return an event marking the copies' end."""
    if stream is None:
        return None
    if stream != caller:
        for t in tensors:
            if t.is_cuda:
                t.record_stream(stream)   # the allocator must not reuse t before this stream is done with it
    event = torch.cuda.Event()
    event.record(stream)
    return event


def copy_to_slots(pool: torch.Tensor, slots: Sequence[int], src: torch.Tensor, stream=None):
    """pool[slots] = src; pool: [S, 2, Hkv, C, D], src: [n, 2, Hkv, C, D]. Returns an event on CUDA."""
    cuda = pool.device if pool.is_cuda else (src.device if src.is_cuda else None)
    scope, stream, caller = _stream_scope(cuda, stream)
    with scope:
        spans = runs(slots)
        if pool.device == src.device and len(spans) > _INDEX_COPY_MIN_RUNS:
            idx = to_device(torch.tensor(list(slots), dtype=torch.long), pool.device)  # idx: [n]
            pool.index_copy_(0, idx, src)                                        # pool: [S, 2, Hkv, C, D]
        else:
            non_blocking = _is_async(pool, src)
            for pos, slot, n in spans:
                pool[slot:slot + n].copy_(src[pos:pos + n], non_blocking=non_blocking)  # [n, 2, Hkv, C, D]
        return _finish(stream, caller, src)


def copy_from_slots(pool: torch.Tensor, slots: Sequence[int], dst: torch.Tensor, stream=None):
    """dst = pool[slots]; returns an event on CUDA."""
    cuda = pool.device if pool.is_cuda else (dst.device if dst.is_cuda else None)
    scope, stream, caller = _stream_scope(cuda, stream)
    with scope:
        spans = runs(slots)
        if len(spans) > _INDEX_COPY_MIN_RUNS:
            # gather on the pool's side first, so scattered chunks cross the bus in one copy
            idx = to_device(torch.tensor(list(slots), dtype=torch.long), pool.device)  # idx: [n]
            packed = pool.index_select(0, idx)                                   # packed: [n, 2, Hkv, C, D]
            dst.copy_(packed, non_blocking=_is_async(packed, dst))
        else:
            non_blocking = _is_async(pool, dst)
            for pos, slot, n in spans:
                dst[pos:pos + n].copy_(pool[slot:slot + n], non_blocking=non_blocking)  # [n, 2, Hkv, C, D]
        return _finish(stream, caller, dst)


class TensorTier:
    """The Tier mechanism over one tensor of slots [S, 2, Hkv, C, D]; subclasses choose where it lives."""

    name = ""

    def __init__(self, shape: ChunkShape, storage: torch.Tensor):
        self.shape, self.capacity, self.storage = shape, storage.shape[0], storage  # storage: [S, 2, Hkv, C, D]
        self._slots = SlotAllocator(self.capacity, self.name)

    def alloc(self, n: int) -> list[int]:
        return self._slots.alloc(n)

    def free(self, slots: Sequence[int]) -> None:
        self._slots.free(slots)

    def write(self, slots: Sequence[int], src: torch.Tensor, stream=None):
        _check("src", src, len(slots), self.shape)
        return copy_to_slots(self.storage, slots, src, stream)

    def read(self, slots: Sequence[int], dst: torch.Tensor, stream=None):
        _check("dst", dst, len(slots), self.shape)
        return copy_from_slots(self.storage, slots, dst, stream)

    @property
    def num_free(self) -> int:
        return self._slots.num_free


class DevicePool(TensorTier):
    """Tier "gpu": chunk slots in one tensor on the compute device."""

    name = "gpu"

    def __init__(self, shape: ChunkShape, capacity: int, device: torch.device | str):
        self.device = torch.device(device)
        self.pool = torch.empty((capacity, *shape.shape), dtype=shape.dtype,
                                device=self.device)                             # pool: [S, 2, Hkv, C, D]
        super().__init__(shape, self.pool)

