"""TieredStore: chunk KV in device pool → host memory → local disk, LRU with demotion.

A chunk is looked up by key (:func:`chunk_key`). ``fetch`` brings it into the device pool
(promoting it from host or disk) and returns its pages; ``put`` stores new KV. When the
pool is full, the least recently used unpinned chunk is demoted to host memory; when host
memory is over capacity, the least recently used host chunk goes to disk; when the disk is
over capacity, the oldest file is dropped. Pinned chunks (see :meth:`pin`) are never
evicted.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from kvfuse._errors import StoreError
from kvfuse.store._disk import DiskTier
from kvfuse.store._keys import Namespace
from kvfuse.store._pool import KVPool
from kvfuse.store._remote import RemoteTier

TIERS = ("device", "host", "disk", "remote")


@dataclass
class StoreStats:
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    misses: int = 0
    puts: int = 0
    demotions: dict[str, int] = field(
        default_factory=lambda: {"device->host": 0, "host->disk": 0, "disk->drop": 0, "host->drop": 0}
    )
    bytes_moved: dict[str, int] = field(
        default_factory=lambda: {
            "device->host": 0,
            "host->disk": 0,
            "host->device": 0,
            "disk->device": 0,
            "remote->device": 0,
            "device->remote": 0,
        }
    )
    remote_failures: int = 0
    remote_corrupt: int = 0

    def hit_rate(self) -> float:
        total = sum(self.hits.values()) + self.misses
        return sum(self.hits.values()) / total if total else 0.0


@dataclass
class _Entry:
    key: str
    num_tokens: int
    nbytes: int
    tier: str
    pages: list[int] | None = None
    host: tuple[torch.Tensor, torch.Tensor] | None = None
    pins: int = 0


class TieredStore:
    """Chunk KV across a device pool, host memory and a disk directory.

    Args:
        namespace: the model and KV layout; part of every key.
        pool: the device tier (its pages are what attention reads).
        host_bytes: capacity of the host tier (0: none).
        disk_dir: the disk tier's directory (None: none). Several processes may share one.
        disk_bytes: capacity of the disk tier.
        remote: a remote tier (Mooncake Store): looked up on a local miss, new chunks
            published to it; its failures degrade to the local tiers, never fail a call.
    """

    def __init__(
        self,
        namespace: Namespace,
        pool: KVPool,
        *,
        host_bytes: int = 1 << 30,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int = 8 << 30,
        remote: RemoteTier | None = None,
    ) -> None:
        self.namespace = namespace
        self.pool = pool
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self.disk = DiskTier(disk_dir, namespace) if disk_dir is not None else None
        self.stats = StoreStats()
        self.remote = remote
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU: oldest first
        if self.disk is not None:  # rebuild the index from disk
            for e in self.disk.scan():
                self._entries[e.key] = _Entry(e.key, e.num_tokens, e.nbytes, "disk")

    # -- queries -------------------------------------------------------------------------

    def tier(self, key: str) -> str | None:
        """Where the chunk is now (None if not stored); does not touch the LRU order."""
        e = self._entries.get(key)
        if e is not None:
            return e.tier
        if self.disk is not None and self.disk.path(key).exists():
            return "disk"
        return None

    def used(self, tier: str) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.tier == tier)

    def __contains__(self, key: str) -> bool:
        return self.tier(key) is not None

    # -- the main calls --------------------------------------------------------------------

    def fetch(self, key: str) -> list[int] | None:
        """The chunk's pages in the device pool (promoted there if needed), or None on a miss."""
        e = self._entries.get(key)
        if e is None and self.disk is not None and self.disk.path(key).exists():
            e = _Entry(key, 0, 0, "disk")  # written by another process
        if e is None:
            return self._fetch_remote(key)
        self.stats.hits[e.tier] += 1
        if e.tier == "device":
            self._entries.move_to_end(key)
            assert e.pages is not None
            return e.pages
        if e.tier == "host":
            assert e.host is not None
            k, v = e.host
            source = "host->device"
        else:
            assert self.disk is not None
            loaded = self.disk.read(key)
            if loaded is None:  # corrupt or vanished: a miss, never wrong KV
                self._entries.pop(key, None)
                self.stats.hits["disk"] -= 1
                self.stats.misses += 1
                return None
            k, v = loaded
            source = "disk->device"
        pages = self._place(key, k, v, pinned=e.pins)
        self.stats.bytes_moved[source] += 2 * k.numel() * k.element_size()
        return pages

    def _fetch_remote(self, key: str) -> list[int] | None:
        """A local miss: look in the remote tier before the caller recomputes."""
        loaded = self.remote.get(key) if self.remote is not None else None
        self._sync_remote_counters()
        if loaded is None:
            self.stats.misses += 1
            return None
        k, v = loaded
        self.stats.hits["remote"] += 1
        self.stats.bytes_moved["remote->device"] += 2 * k.numel() * k.element_size()
        return self._place(key, k, v, pinned=0)

    def _publish(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.remote is not None and self.remote.put(key, k, v):
            self.stats.bytes_moved["device->remote"] += 2 * k.numel() * k.element_size()
        self._sync_remote_counters()

    def _sync_remote_counters(self) -> None:
        if self.remote is not None:
            self.stats.remote_failures, self.stats.remote_corrupt = self.remote.failures, self.remote.corrupt

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """Store a chunk's K/V ([num_layers, num_tokens, num_kv_heads, head_dim], un-rotated
        keys); returns its pages in the device pool."""
        want = self.namespace.chunk_shape(k.shape[1])
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.namespace.torch_dtype:
            raise StoreError(f"chunk KV must be {want} {self.namespace.dtype}, got {tuple(k.shape)} {k.dtype}")
        self.stats.puts += 1
        old = self._entries.get(key)
        pages = self._place(key, k, v, pinned=old.pins if old else 0)
        self._publish(key, k, v)
        return pages

    def commit(self, key: str, pages: list[int], num_tokens: int) -> None:
        """Register KV that the caller already wrote into ``pages`` of the pool (e.g. by
        ``append_kv`` during prefill); the pages now belong to the store."""
        self.stats.puts += 1
        self._entries[key] = _Entry(key, num_tokens, self._nbytes(num_tokens), "device", pages=pages)
        self._entries.move_to_end(key)
        if self.remote is not None and self.remote.up:  # publish for other machines
            self._publish(key, *self.pool.read(pages, num_tokens))

    def allocate(self, num_tokens: int) -> list[int]:
        """Pages for a new chunk, making room by demotion if needed (see :meth:`commit`)."""
        need = self.pool.pages_for(num_tokens)
        pages = self.pool.alloc(need)
        while pages is None:
            self._demote_one_device()
            pages = self.pool.alloc(need)
        return pages

    def hold(self, key: str) -> None:
        """Pin one chunk: never evicted until :meth:`unhold` (counted)."""
        self._entries[key].pins += 1

    def unhold(self, key: str) -> None:
        e = self._entries.get(key)
        if e is not None and e.pins > 0:
            e.pins -= 1

    @contextlib.contextmanager
    def pin(self, keys: Iterable[str]) -> Iterator[None]:
        """Within this block the chunks are never evicted (e.g. while a request uses them)."""
        held = [k for k in keys if k in self._entries]
        for k in held:
            self.hold(k)
        try:
            yield
        finally:
            for k in held:
                self.unhold(k)

    # -- placement and eviction -------------------------------------------------------------

    def _nbytes(self, num_tokens: int) -> int:
        ns = self.namespace
        return 2 * ns.num_layers * num_tokens * ns.num_kv_heads * ns.head_dim * self.namespace.torch_dtype.itemsize

    def _place(self, key: str, k: torch.Tensor, v: torch.Tensor, pinned: int) -> list[int]:
        old = self._entries.pop(key, None)
        if old is not None and old.pages is not None:
            self.pool.release(old.pages)
        self._entries[key] = _Entry(key, k.shape[1], self._nbytes(k.shape[1]), "device", pins=pinned + 1)
        try:  # pinned while it is placed, so making room never picks it
            pages = self.allocate(k.shape[1])
        finally:
            self._entries[key].pins -= 1
        self.pool.write(pages, k, v)
        self._entries[key].pages = pages
        self._entries.move_to_end(key)
        return pages

    def _victim(self, tier: str) -> _Entry | None:
        return next((e for e in self._entries.values() if e.tier == tier and e.pins == 0 and e.pages != []), None)

    def _demote_one_device(self) -> None:
        e = self._victim("device")
        if e is None or e.pages is None:
            raise StoreError(f"device pool full: {self.pool.num_pages} pages, all pinned or in use")
        k, v = self.pool.read(e.pages, e.num_tokens)
        self.pool.release(e.pages)
        e.pages, e.host, e.tier = None, (k, v), "host"
        self.stats.demotions["device->host"] += 1
        self.stats.bytes_moved["device->host"] += e.nbytes
        self._trim_host()

    def _trim_host(self) -> None:
        while self.used("host") > self.host_bytes:
            e = self._victim("host")
            if e is None:
                return
            assert e.host is not None
            if self.disk is not None:
                e.nbytes = self.disk.write(e.key, *e.host)
                e.tier, e.host = "disk", None
                self.stats.demotions["host->disk"] += 1
                self.stats.bytes_moved["host->disk"] += e.nbytes
                self._trim_disk()
            else:
                del self._entries[e.key]
                self.stats.demotions["host->drop"] += 1

    def _trim_disk(self) -> None:
        assert self.disk is not None
        while self.used("disk") > self.disk_bytes:
            e = self._victim("disk")
            if e is None:
                return
            self.disk.delete(e.key)
            del self._entries[e.key]
            self.stats.demotions["disk->drop"] += 1
