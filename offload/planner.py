"""Budget planner: how many KV chunks each tier holds, decided before any weight is loaded.

KV is placed GPU first, then host, then disk; each tier gets only what the context needs. Budgets
not given are detected:
    GPU:  torch.cuda.mem_get_info() free bytes, minus the weights, minus a reserve for activations and
          staging (max(1.5 GiB, 10% of the GPU)); on a CPU device the "GPU" tier is a quarter of host RAM.
    host: psutil available RAM minus headroom (max(4 GiB, 20%)): pinned pages cannot be swapped, and
          the OS, the page cache of the weights and the disk staging ring still need room.
    disk: shutil.disk_usage(disk_dir).free minus 5% (or 1 GiB); no disk_dir, no disk tier.
Given budgets (--gpu-mem / --host-mem / --disk-mem) are KV budgets for that tier, used as given.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

import torch

from offload.errors import CapacityError

# A 512K prefill under a 24 GiB cap ran out of memory with 1.7 GiB free in pieces (freed blocks that fit no later
# request); expandable segments map device memory as it is needed instead. Read at the first CUDA allocation, so
# it applies whenever offload is imported first; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

GiB = 1 << 30
_GPU_RESERVE_MIN, _GPU_RESERVE_FRAC = int(1.5 * GiB), 0.10
_HOST_HEADROOM_MIN, _HOST_HEADROOM_FRAC = 4 * GiB, 0.20
_DISK_HEADROOM_MIN, _DISK_HEADROOM_FRAC = 1 * GiB, 0.05


def _tokens(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _gib(n: float) -> str:
    g = n / GiB
    return f"{g:.0f}" if abs(g - round(g)) < 0.05 or g >= 100 else f"{g:.1f}"


def _size(n: int) -> str:
    return f"{_gib(n)} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class BudgetPlan:
    """Chunk capacities per tier (pass `capacities` to TieredKVStore) and what they cost."""
    ctx: int
    chunk_tokens: int
    chunk_bytes: int              # one chunk of one layer: [2, Hkv, C, D]
    num_layers: int
    gpu_chunks: int
    host_chunks: int
    disk_chunks: int
    kv_bytes: int                 # the whole context's KV
    weight_bytes: int
    gpu_reserve_bytes: int        # kept free on the GPU for activations and staging
    available: tuple[int, int, int]   # KV budget bytes found per tier (gpu, host, disk)
    disk_dir: str | None
    index_bytes: int = 0          # GPU bytes of sparse selection at full ctx (index, token-stage scratch)
    kv_dtype: str = "bf16"         # how the host and disk tiers hold KV (int8 / int4: packed chunks)
    cold_chunk_bytes: int = 0     # one host/disk chunk when packed (0: chunk_bytes)
    index_options: tuple = ()     # index options the planner chose, as (name, value) pairs: (("shadows_on", "host"),)
    selection: tuple = ()         # index "auto": the selection options the planner chose (offload/selection.py)

    @property
    def capacities(self) -> tuple[int, int, int]:
        return self.gpu_chunks, self.host_chunks, self.disk_chunks

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_chunks * self.chunk_bytes

    @property
    def host_bytes(self) -> int:
        return self.host_chunks * (self.cold_chunk_bytes or self.chunk_bytes)

    @property
    def disk_bytes(self) -> int:
        return self.disk_chunks * (self.cold_chunk_bytes or self.chunk_bytes)

    def summary(self) -> str:
        cold = f" {self.kv_dtype}" if self.kv_dtype != "bf16" else ""   # KV dtype of the host and disk tiers
        disk = f" + disk {_gib(self.disk_bytes)} GiB{cold}" + (f" ({self.disk_dir})" if self.disk_dir else "")
        return (f"KV {_gib(self.kv_bytes)} GiB for ctx {_tokens(self.ctx)} ({self.chunk_tokens}-token chunks): "
                f"GPU {_gib(self.gpu_bytes)} + host {_gib(self.host_bytes)} GiB{cold}"
                + (disk if self.disk_chunks else "")
                + (f"; sparse index {_size(self.index_bytes)} on the GPU" if self.index_bytes else "")
                + "".join(f", {k}={v}" for k, v in self.index_options)
                + (f"; selection: {_describe(self.selection)}" if self.selection else ""))


def _describe(selection: tuple) -> str:
    from offload.selection import describe
    return describe(selection)


def _detect_gpu(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    # a per-process cap (set_per_process_memory_fraction, how we model a 24 GB card) is invisible to mem_get_info
    idx = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(idx)
    # blocks our caching allocator holds but no tensor uses are ours to reuse (it empties them before an OOM):
    # counting them as taken refused the 8B weights after a benchmark had freed its large tensors
    allocated = torch.cuda.memory_allocated(idx)
    free += torch.cuda.memory_reserved(idx) - allocated
    frac = torch.cuda.get_per_process_memory_fraction(idx)
    if frac < 1.0:
        free = min(free, int(frac * total) - allocated)
    return max(0, int(free))


def _gpu_usable_total(device: torch.device) -> int:
    """The card's memory, or the per-process cap when one is set."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(idx).total_memory * torch.cuda.get_per_process_memory_fraction(idx))


def _detect_host() -> int:
    import psutil
    vm = psutil.virtual_memory()
    return max(0, int(vm.available) - max(_HOST_HEADROOM_MIN, int(_HOST_HEADROOM_FRAC * vm.total)))


def _detect_disk(disk_dir: str | None) -> int:
    if not disk_dir:
        return 0
    probe = os.path.abspath(disk_dir)
    while probe and not os.path.exists(probe):      # the store creates disk_dir; measure its parent
        probe = os.path.dirname(probe.rstrip("/")) or "/"
    usage = shutil.disk_usage(probe)
    return max(0, int(usage.free) - max(_DISK_HEADROOM_MIN, int(_DISK_HEADROOM_FRAC * usage.total)))


def plan_budget(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int, ctx: int,
                weight_bytes: int, device: torch.device | str = "cpu", gpu_mem: int | None = None,
                host_mem: int | None = None, disk_mem: int | None = None, disk_dir: str | None = None,
                chunk_tokens: int = 32, sink_chunks: int = 1, window_chunks: int = 4,
                index_bytes: int = 0, kv_dtype: str = "bf16", cold_chunk_bytes: int | None = None,
                stage_bytes: int = 0) -> BudgetPlan:
    """Split the KV of `ctx` tokens over GPU, host and disk, or raise CapacityError saying what to change.
    stage_bytes: GPU bytes a tiered prefill stages (its window and streamed blocks), reserved beside activations."""
    device = torch.device(device)
    chunk_bytes = 2 * num_kv_heads * chunk_tokens * head_dim * dtype_bytes
    per_layer = math.ceil(ctx / chunk_tokens)
    total = num_layers * per_layer
    kv_bytes = total * chunk_bytes
    reserve = 0
    host = host_mem if host_mem is not None else None
    if device.type == "cuda":
        free = _detect_gpu(device)
        reserve = max(_GPU_RESERVE_MIN, int(_GPU_RESERVE_FRAC * _gpu_usable_total(device))) + stage_bytes
        room = max(0, free - weight_bytes - index_bytes - reserve)
        if weight_bytes + reserve > free:   # say so: the tiers' own messages would blame a KiB-sized KV need
            raise CapacityError(f"the weights do not fit on the GPU: {_gib(weight_bytes)} GiB of weights + "
                                f"{_gib(reserve)} GiB for activations and prefill staging, {_gib(free)} GiB free; use a smaller model, "
                                "--dtype bfloat16, a GPU with more memory, or --device cpu")
        if gpu_mem is not None and gpu_mem > room:
            index = f", {_gib(index_bytes)} GiB to sparse selection (index, token-stage scratch)" if index_bytes else ""
            raise CapacityError(f"--gpu-mem {_gib(gpu_mem)} GiB of KV does not fit: the GPU has {_gib(free)} GiB free, "
                                f"{_gib(weight_bytes)} GiB go to weights{index} and {_gib(reserve)} GiB to activations and prefill staging; "
                                f"lower --gpu-mem to {_gib(room)} GiB or less")
        gpu = room if gpu_mem is None else gpu_mem
        if host is None:
            host = _detect_host()
    else:
        # CPU: both "tiers" are host RAM; the weights live there too
        ram = max(0, _detect_host() - weight_bytes) if (gpu_mem is None or host is None) else 0
        gpu = gpu_mem if gpu_mem is not None else ram // 4
        if host is None:
            host = max(0, ram - gpu)
    if disk_mem and not disk_dir:
        raise CapacityError("--disk-mem needs a place for the files; pass --disk-dir")
    disk = _detect_disk(disk_dir)
    if disk_mem is not None:
        if disk_dir and disk_mem > disk:
            raise CapacityError(f"--disk-mem {_gib(disk_mem)} GiB but {disk_dir} has {_gib(disk)} GiB to spare "
                                f"(free space less a reserve of max({_gib(_DISK_HEADROOM_MIN)} GiB, "
                                f"{_DISK_HEADROOM_FRAC:.0%} of the drive) so the disk never fills); "
                                "free space there or lower --disk-mem")
        disk = disk_mem
    # the store pins sinks + window of every layer on the GPU tier, even for a context shorter than that
    pinned = num_layers * (sink_chunks + window_chunks)
    g = min(max(total, pinned), gpu // chunk_bytes)
    if g < pinned:
        taken = f" once {_gib(index_bytes)} GiB go to sparse selection (index, token-stage scratch)" if index_bytes else ""
        fix = ("lower --budget (with --select-unit token: or use chunk, or fewer token_candidates) or use a "
               "smaller model" if index_bytes and gpu_mem is None else "raise --gpu-mem or use a smaller model")
        raise CapacityError(f"the GPU tier needs {_size(pinned * chunk_bytes)} for the sinks and local windows of "
                            f"{num_layers} layers but has {_size(gpu)}{taken}; {fix}")
    cold = cold_chunk_bytes or chunk_bytes      # host and disk hold packed chunks when kv_dtype is int8/int4
    h = min(max(0, total - g), host // cold)
    d = min(max(0, total - g - h), disk // cold)
    if g + h + d < total:
        fix = "raise --disk-mem or lower --ctx" if disk_dir else "pass --disk-dir (NVMe) or lower --ctx"
        if kv_dtype == "bf16":
            fix += ", or compress host and disk KV with --kv-dtype int8 (0.56x) or int4 (0.31x)"
        raise CapacityError(f"ctx {_tokens(ctx)} needs {_gib(kv_bytes)} GiB of KV; GPU {_gib(gpu)} + "
                            f"host {_gib(host)} + disk {_gib(disk)} = {_gib(gpu + host + disk)} GiB available; {fix}")
    return BudgetPlan(ctx=ctx, chunk_tokens=chunk_tokens, chunk_bytes=chunk_bytes, num_layers=num_layers,
                      gpu_chunks=g, host_chunks=h, disk_chunks=d, kv_bytes=kv_bytes, weight_bytes=weight_bytes,
                      gpu_reserve_bytes=reserve, available=(gpu, host, disk), disk_dir=disk_dir,
                      index_bytes=index_bytes if device.type == "cuda" else 0, kv_dtype=kv_dtype,
                      cold_chunk_bytes=cold if cold != chunk_bytes else 0)
