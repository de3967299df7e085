"""The planner: a request's chunks → stored segments at their new positions, hits, misses
(with pages to fill), and pages for the live tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from kvfuse._errors import InvalidValueError, StoreError
from kvfuse.ops import SegmentTable
from kvfuse.store._keys import chunk_key
from kvfuse.store._promote import Loading
from kvfuse.store._store import TieredStore


@dataclass(eq=False)
class Plan:
    """One request. Chunk i sits at ``positions[i]`` on ``pages[i]``; the live tokens follow
    the last chunk.

    ``hits`` and ``misses`` list the first occurrence of each distinct chunk; a chunk that
    occurs again shares the pages of its first occurrence. A miss's pages are lent to this
    request: compute its KV into them, then :meth:`commit`, which may replace ``pages[i]``
    by the stored copy's pages (another request committed the chunk first), so read
    ``pages`` and :meth:`segments` after committing. :meth:`close` (or :meth:`abort`)
    gives back every page still lent and every pin this request holds, once.
    """

    store: TieredStore
    keys: list[str]
    lengths: list[int]
    positions: list[int]
    pages: list[list[int]]
    hits: list[int]
    misses: list[int]
    live_len: int
    live_pages: list[int]
    committed: set[int] = field(default_factory=set)
    loading: Loading | None = None  # the hits' promotions, if planned with one
    _held: list[str] = field(default_factory=list, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def live_pos(self) -> int:
        return self.positions[-1] + self.lengths[-1] if self.keys else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def segments(self, *, stored: bool = True, live: bool = True) -> SegmentTable:
        """A one-request table: the chunks (if ``stored``), then the live tokens (if ``live``)."""
        segs: list[tuple[list[int], int, int]] = []
        if stored:
            segs += [(p, n, pos) for p, n, pos in zip(self.pages, self.lengths, self.positions)]
        if live:
            segs.append((self.live_pages, self.live_len, self.live_pos))
        return SegmentTable.from_lists([segs], device=self.store.pool.device)

    def live_slots(self) -> torch.Tensor:
        """slot_mapping of the live tokens: [live_len], int64"""
        return self.store.pool.slots(self.live_pages, self.live_len)

    def live_positions(self) -> torch.Tensor:
        """Positions of the live tokens: [live_len], int32"""
        return torch.arange(
            self.live_pos, self.live_pos + self.live_len, dtype=torch.int32, device=self.store.pool.device
        )

    def lent(self) -> list[int]:
        """Pages lent to this request now (uncommitted misses and the live tokens)."""
        if self._closed:
            return []
        return [p for i in self.misses if i not in self.committed for p in self.pages[i]] + list(self.live_pages)

    def commit(self, i: int) -> list[int]:
        """Chunk ``i`` (a miss) has been filled: hand its pages to the store, pinned for this
        request. Returns the pages that hold it now (also in ``pages`` for every occurrence)."""
        if self._closed or i not in self.misses or i in self.committed:
            raise StoreError(f"commit of chunk {i}: not an open, uncommitted miss of this plan")
        key = self.keys[i]
        kept = self.store.commit(key, self.pages[i], self.lengths[i], holder=self)
        self.committed.add(i)
        self._held.append(key)
        for j, other in enumerate(self.keys):
            if other == key:
                self.pages[j] = kept
        return kept

    def close(self) -> None:
        """Give back what this request holds: uncommitted pages, live pages, pins. Once."""
        if self._closed:
            return
        with self.store._lock:
            self._closed = True
            if self.loading is not None:  # promotions it never started must still finish
                self.loading.start()
            uncommitted = [p for i in self.misses if i not in self.committed for p in self.pages[i]]
            self.store.release(uncommitted + list(self.live_pages))
            for key in self._held:
                self.store.unhold(key, self)

    abort = close  # a request that ends early: nothing it did not commit is kept

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan(
    store: TieredStore,
    chunks: Sequence[Sequence[int]],
    live_tokens: int,
    keys: Sequence[str] | None = None,
    loading: Loading | None = None,
) -> Plan:
    """Look every chunk up (promoting hits into the device pool, pinned for the request),
    lend pages for misses and for ``live_tokens`` live tokens after the last chunk. If any
    step fails, what the earlier steps took is given back before the error propagates.
    ``keys``: each chunk's store key, if not ``chunk_key`` of its tokens alone (e.g. one
    with the context it is computed after). ``loading`` (``store.loading()``): the hits'
    promotions are started, not awaited: call ``loading.wait(layer)`` before reading a
    layer of them."""
    if keys is None:
        keys = [chunk_key(store.namespace, list(c)) for c in chunks]
    elif len(keys) != len(chunks):
        raise InvalidValueError("keys", f"one key per chunk ({len(chunks)})", len(keys))
    keys = list(keys)
    lengths = [len(c) for c in chunks]
    positions = [sum(lengths[:i]) for i in range(len(chunks))]
    p = Plan(store, keys, lengths, positions, [[] for _ in keys], [], [], live_tokens, [], loading=loading)
    first: dict[str, int] = {}
    try:
        with store._lock:
            for i, key in enumerate(keys):
                if key in first:  # repeated in this request: share the first occurrence
                    continue
                first[key] = i
                found = store.fetch(key, holder=p, loading=loading)
                if found is not None:
                    p._held.append(key)
                    p.hits.append(i)
                    p.pages[i] = found
                else:
                    p.pages[i] = store.allocate(lengths[i])
                    p.misses.append(i)
            for i, key in enumerate(keys):
                p.pages[i] = p.pages[first[key]]
            p.live_pages = store.allocate(live_tokens)
        if loading is not None:
            loading.start()
    except BaseException:
        p.close()
        raise
    return p
