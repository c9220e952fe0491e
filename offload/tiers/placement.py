"""Where the chunks of one put() go: the decision only, as lists; `store.py` carries it out.

Device level: the device tier must hold its residents plus the n new chunks. If that overflows, the
policy picks victims among the unpinned residents AND the unpinned new chunks (a new chunk the policy
ranks lowest goes straight to the host, never copied twice). Host level: the same with the host
residents and whatever the device level pushed down. What the host level pushes down goes to disk;
if disk has no room, nothing has moved yet and the put is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offload.errors import CapacityError
from offload.tiers.policy import EvictionPolicy

GPU, HOST, DISK = 0, 1, 2
TIER_NAMES = ("gpu", "host", "disk")


@dataclass
class Moves:
    """Slots are source slots of residents; positions index the put's kv [n, ...]."""
    gpu_to_host: list[int] = field(default_factory=list)
    gpu_to_disk: list[int] = field(default_factory=list)
    host_to_disk: list[int] = field(default_factory=list)
    new_gpu: list[int] = field(default_factory=list)
    new_host: list[int] = field(default_factory=list)
    new_disk: list[int] = field(default_factory=list)


@dataclass
class Residents:
    """Chunks held by one tier: slot, layer, chunk id (int64 [m] each)."""
    slots: torch.Tensor
    layers: torch.Tensor
    chunks: torch.Tensor


def _pick(policy: EvictionPolicy, layers: torch.Tensor, chunks: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask [m] of the n candidates the policy demotes first."""
    out = torch.zeros(chunks.numel(), dtype=torch.bool)                         # out: [m]
    if n > 0:
        out[policy.victims(layers, chunks, n)] = True
    return out


def plan_put(policy: EvictionPolicy, layer: int | torch.Tensor, new_ids: torch.Tensor, num_chunks: torch.Tensor,
             gpu, gpu_free: int, host, host_free: int, disk_free: int,
             gpu_headroom: int = 0, host_headroom: int = 0) -> Moves:
    """Decide the moves for putting new_ids (int64 [n]) of `layer` (or of layers int64 [n], one per new chunk);
    num_chunks: int64 [L] after the put.
    gpu, host: Residents, or callables returning them (only called when the device tier overflows).

    When the device tier overflows, `gpu_headroom` more chunks than needed are demoted in the same
    batch, so the next puts (one chunk per layer every C decode tokens) find free slots and skip the
    O(residents) victim ranking. `host_headroom` does the same at the host level, where the ranking is over
    every host resident (~740K chunks of int8 KV in 48 GiB at 1M tokens): without it every put that spills
    ranked them all (a synthetic 1M fill spent most of its time there, issue 12).
    """
    n = new_ids.numel()
    moves = Moves()
    if n <= gpu_free:      # everything fits on the device: no ranking, no scan of the residents
        moves.new_gpu = list(range(n))
        return moves
    gpu = gpu() if callable(gpu) else gpu          # Residents, or a callable that finds them
    new_layers = torch.full_like(new_ids, layer) if isinstance(layer, int) else layer   # new_layers: [n]
    # device level: residents first, then the new chunks, as one candidate list
    cand_layers = torch.cat([gpu.layers, new_layers])                           # [r + n]
    cand_chunks = torch.cat([gpu.chunks, new_ids])                              # [r + n]
    pinned = policy.pinned(cand_chunks, num_chunks[cand_layers])                # pinned: [r + n]
    excess = n - gpu_free
    down = torch.zeros(cand_chunks.numel(), dtype=torch.bool)                   # down: [r + n]
    if excess > 0:
        free_idx = torch.nonzero(~pinned).flatten()                             # free_idx: [u]
        if free_idx.numel() < excess:
            raise CapacityError(f"GPU tier of {gpu.slots.numel() + gpu_free} chunks cannot hold the pinned sinks "
                                "and local windows; raise --gpu-mem or shorten the window")
        # the slack only where the tiers below have room for it: it must never make a put fail
        extra = min(gpu_headroom, max(0, host_free + disk_free - excess))
        excess = min(excess + extra, free_idx.numel())
        down[free_idx[_pick(policy, cand_layers[free_idx], cand_chunks[free_idx], excess)]] = True
    r = gpu.slots.numel()
    res_down, new_down = down[:r], down[r:]                                     # [r], [n]
    moves.new_gpu = torch.nonzero(~new_down).flatten().tolist()                 # positions into kv
    # host level: host residents, then what the device level pushed down
    pushed_slots = gpu.slots[res_down]                                          # [a]
    pushed_new = torch.nonzero(new_down).flatten()                              # [b]
    if pushed_slots.numel() + pushed_new.numel() <= host_free:   # the host has room: no scan of its residents
        moves.gpu_to_host, moves.new_host = pushed_slots.tolist(), pushed_new.tolist()
        return moves
    host = host() if callable(host) else host
    h_layers = torch.cat([host.layers, gpu.layers[res_down], new_layers[pushed_new]])  # [h + a + b]
    h_chunks = torch.cat([host.chunks, gpu.chunks[res_down], new_ids[pushed_new]])     # [h + a + b]
    excess_h = h_chunks.numel() - host.slots.numel() - host_free
    # the slack only where the disk has room for it: it must never make a put fail
    excess_h = min(excess_h + min(host_headroom, max(0, disk_free - excess_h)), h_chunks.numel())
    to_disk = _pick(policy, h_layers, h_chunks, excess_h)                       # to_disk: [h + a + b]
    hr, a = host.slots.numel(), pushed_slots.numel()
    if int(to_disk.sum()) > disk_free:
        raise CapacityError(f"KV store is full: {int(to_disk.sum())} chunks must go to disk, which has room for "
                            f"{disk_free}; raise --disk-mem (or --host-mem / --gpu-mem) or lower --ctx")
    moves.host_to_disk = host.slots[to_disk[:hr]].tolist()
    moves.gpu_to_disk = pushed_slots[to_disk[hr:hr + a]].tolist()
    moves.gpu_to_host = pushed_slots[~to_disk[hr:hr + a]].tolist()
    moves.new_disk = pushed_new[to_disk[hr + a:]].tolist()
    moves.new_host = pushed_new[~to_disk[hr + a:]].tolist()
    return moves


@dataclass
class Swaps:
    """A promotion decision: GPU residents (their slots) that make room, and hot host chunks (positions into the
    hot list) that take it; equally many of each, the hottest first and the coldest first."""
    down: list[int] = field(default_factory=list)
    up: list[int] = field(default_factory=list)


def plan_swaps(policy: EvictionPolicy, gpu: Residents, hot_layers: torch.Tensor, hot_chunks: torch.Tensor,
               num_chunks: torch.Tensor, limit: int) -> Swaps:
    """Which host chunks the decode steps just selected (hot_layers, hot_chunks: int64 [h]) should trade places
    with which unpinned GPU residents, by the policy's own ranking: rank both together; whatever lands in the
    |hot| lowest ranks belongs below the GPU, so each GPU resident among them trades with a hot chunk above them.
    At most `limit` pairs (the copies of one promotion round)."""
    movable = ~policy.pinned(gpu.chunks, num_chunks[gpu.layers])                # movable: [r] bool
    slots = gpu.slots[movable]                                                  # slots: [r']
    r, h = slots.numel(), hot_chunks.numel()
    if not r or not h or limit <= 0:
        return Swaps()
    cand_layers = torch.cat([gpu.layers[movable], hot_layers])                  # [r' + h]
    cand_chunks = torch.cat([gpu.chunks[movable], hot_chunks])                  # [r' + h]
    order = policy.victims(cand_layers, cand_chunks, r + h)                     # order: [r' + h] coldest first
    low, high = order[:h], order[h:]                                            # [h], [r']
    down = low[low < r][:limit]                                                 # GPU residents, coldest first
    up = high.flip(0)                                                           # hottest first
    up = up[up >= r][:down.numel()] - r                                         # positions into the hot list
    return Swaps(slots[down[:up.numel()]].tolist(), up.tolist())
