"""Tiered KV storage: GPU pool -> pinned host slab -> disk file, a chunk table, eviction policies."""
from offload.tiers.base import ChunkShape, Tier
from offload.tiers.device import DevicePool
from offload.tiers.disk import DiskStore
from offload.tiers.diskdir import sweep_stale
from offload.tiers.fetch import FetchPlan, PendingFetch
from offload.tiers.host import HostPool
from offload.tiers.policy import AttentionMassPolicy, EvictionPolicy, LRUPolicy, make_policy
from offload.tiers.store import TieredKVStore

__all__ = ["ChunkShape", "Tier", "DevicePool", "HostPool", "DiskStore", "sweep_stale", "FetchPlan",
           "PendingFetch", "EvictionPolicy", "LRUPolicy", "AttentionMassPolicy", "make_policy",
           "TieredKVStore"]
