"""kvfuse.store: the tiered KV store (device pool → host memory → disk) and the planner
that turns a request's chunks into a SegmentTable."""

from __future__ import annotations

from kvfuse.store._keys import FORMAT_VERSION, Namespace, chunk_key
from kvfuse.store._planner import Plan, plan
from kvfuse.store._pool import KVPool
from kvfuse.store._promote import Loading
from kvfuse.store._remote import LocalMaster, RemoteConfig, RemoteTier
from kvfuse.store._store import TIERS, StoreStats, TieredStore

__all__ = [
    "FORMAT_VERSION",
    "TIERS",
    "KVPool",
    "Loading",
    "LocalMaster",
    "Namespace",
    "Plan",
    "RemoteConfig",
    "RemoteTier",
    "StoreStats",
    "TieredStore",
    "chunk_key",
    "plan",
]
