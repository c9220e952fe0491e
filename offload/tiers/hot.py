"""Hot chunks up to the GPU pool during decode (issue 13): the mechanism; the decision is placement.plan_swaps.

Without it the GPU pool holds whatever was newest when each chunk was put, and a chunk that decode keeps
selecting is read from the host slab over PCIe at every step for the rest of the session. Once per chunk of
tokens (at `feedback`), the host chunks the last window's steps selected are ranked against the unpinned GPU
residents by the eviction policy (recency for lru, decayed attention mass for attention); each GPU resident
that ranks below a hot chunk trades places with it: two copies on the copy stream, then the chunk table's rows.

Copies move bytes as they are, so attention reads the same KV wherever a chunk lives (sparse and exact decode
give the same logits with or without promotion). Only a bf16 host tier takes part: a packed (int8/int4) host
chunk would come up dequantized and go down re-quantized, so those sessions keep the placement of put().
"""
from __future__ import annotations

import torch

from offload.tiers.placement import GPU, HOST, plan_swaps
from offload.tiers.sync import new_event


class HotMixin:
    promote_hot: bool = False

    def _hot_enabled(self) -> bool:
        return (self.promote_hot and self.packed is None and self.capacities[GPU] > 0
                and self.capacities[HOST] > 0)

    def _note_hot(self, layer: int, chunk_ids: torch.Tensor) -> None:
        """Selected chunks of `layer` (int64 [m], as the policy just learned them): keep those on the host."""
        if not self._hot_enabled():
            return
        on_host = chunk_ids[self._tier[layer][chunk_ids] == HOST]               # on_host: [h]
        if on_host.numel():
            self._hot.append((torch.full_like(on_host, layer), on_host))

    def _where(self, layers: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tier, slot) of chunks of layers (int64 [h] each) in the host chunk table."""
        tier = torch.empty_like(chunks)                                        # tier: [h]
        slot = torch.empty_like(chunks)                                        # slot: [h]
        for layer in layers.unique().tolist():
            sel = layers == layer                                              # sel: [h] bool
            t, s = self._lookup(layer, chunks[sel])                            # [h'] each
            tier[sel], slot[sel] = t.long(), s
        return tier, slot

    def _promote_hot(self) -> None:
        """Trade the noted hot host chunks for colder GPU residents (at most 32 or 1/16 of the GPU tier a round)."""
        hot, self._hot = getattr(self, "_hot", []), []
        if not hot or not self._hot_enabled():
            return
        layers, chunks = torch.cat([h[0] for h in hot]), torch.cat([h[1] for h in hot])   # [h] each
        width = int(chunks.max()) + 1
        key = (layers * width + chunks).unique()                               # a chunk noted twice counts once
        layers, chunks = key // width, key % width                             # [h] each
        tier, slot = self._where(layers, chunks)                               # [h] each
        layers, chunks, slot = layers[tier == HOST], chunks[tier == HOST], slot[tier == HOST]   # moved since: skip
        sw = plan_swaps(self.policy, self._residents(GPU), layers, chunks, self._num, max(32, self.capacities[GPU] // 16))
        if not sw.up:
            return
        host_slots = slot[torch.tensor(sw.up, dtype=torch.long)].tolist()
        if self._copy is not None:      # the copies follow every attention already queued that reads these slots
            self._copy.wait_stream(torch.cuda.current_stream(self.device))
        down, hs = sw.down, host_slots
        while down:                     # a round needs one free slot below or above for each pair
            n = min(len(down), max(self.tiers[HOST].num_free, self.tiers[GPU].num_free))
            if n == 0:
                break
            if self.tiers[HOST].num_free >= n:
                self._move(GPU, down[:n], HOST)
                self._move(HOST, hs[:n], GPU)
            else:
                self._move(HOST, hs[:n], GPU)
                self._move(GPU, down[:n], HOST)
            self._stats["promoted_hot_chunks"] += n
            down, hs = down[n:], hs[n:]
        if self._copy is not None:      # the next step reads the new slots: after the copies
            torch.cuda.current_stream(self.device).wait_event(new_event(self._copy))
