"""The planner: a request's chunks → stored segments at their new positions, hits, misses
(with pages to fill), and pages for the live tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from kvfuse.ops import SegmentTable
from kvfuse.store._keys import chunk_key
from kvfuse.store._store import TieredStore


@dataclass
class Plan:
    """One request. Chunk i sits at ``positions[i]`` on ``pages[i]``; the live tokens follow
    the last chunk. Chunks in ``misses`` have pages allocated but not yet filled: compute
    their KV into those pages, then :meth:`commit`. :meth:`close` unpins and frees."""

    store: TieredStore
    keys: list[str]
    lengths: list[int]
    positions: list[int]
    pages: list[list[int]]
    hits: list[int]
    misses: list[int]
    live_len: int
    live_pages: list[int]
    _closed: bool = field(default=False, repr=False)

    @property
    def live_pos(self) -> int:
        return self.positions[-1] + self.lengths[-1] if self.keys else 0

    def segments(self, *, stored: bool = True, live: bool = True) -> SegmentTable:
        """A one-request table: the chunks (if ``stored``), then the live tokens (if ``live``)."""
        segs: list[tuple[list[int], int, int]] = []
        if stored:
            segs += [(p, n, pos) for p, n, pos in zip(self.pages, self.lengths, self.positions)]
        if live:
            segs.append((self.live_pages, self.live_len, self.live_pos))
        return SegmentTable.from_lists([segs], device=self.store.pool.device)

    def live_slots(self) -> torch.Tensor:
        return self.store.pool.slots(self.live_pages, self.live_len)

    def live_positions(self) -> torch.Tensor:
        return torch.arange(
            self.live_pos, self.live_pos + self.live_len, dtype=torch.int32, device=self.store.pool.device
        )

    def commit(self, i: int) -> None:
        """Chunk ``i`` (a miss) has been filled: hand its pages to the store, pinned."""
        self.store.commit(self.keys[i], self.pages[i], self.lengths[i])
        self.store.hold(self.keys[i])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for i, key in enumerate(self.keys):
            if i in self.misses and self.store.tier(key) != "device":
                self.store.pool.release(self.pages[i])  # never committed
            else:
                self.store.unhold(key)
        self.store.pool.release(self.live_pages)

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan(store: TieredStore, chunks: Sequence[Sequence[int]], live_tokens: int) -> Plan:
    """Look every chunk up (promoting hits into the device pool, pinned for the request),
    allocate pages for misses and for ``live_tokens`` live tokens after the last chunk."""
    keys = [chunk_key(store.namespace, list(c)) for c in chunks]
    lengths = [len(c) for c in chunks]
    positions = [sum(lengths[:i]) for i in range(len(chunks))]
    pages: list[list[int]] = []
    hits, misses = [], []
    for i, key in enumerate(keys):
        found = store.fetch(key)
        if found is not None:
            store.hold(key)
            hits.append(i)
            pages.append(found)
        else:
            misses.append(i)
            pages.append(store.allocate(lengths[i]))
    live_pages = store.allocate(live_tokens)
    return Plan(store, keys, lengths, positions, pages, hits, misses, live_tokens, live_pages)
