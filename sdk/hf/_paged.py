"""Paged KV of a batch of rows, shared by every layer: each row is one segment of pages
holding its real (non-padding) tokens at consecutive positions, un-rotated.

``PagedRows.step`` plans one forward step once (which new tokens are real, where they go,
the segment table, query positions) and every layer then runs ``append_kv`` +
``fusion_attention`` with that plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from kvfuse._errors import InvalidValueError
from kvfuse.ops import SegmentTable

PAGE_SIZE = 16


@dataclass
class Step:
    """One forward step's plan, shared by every layer.

    slots: [batch * num_new], int64 — pool slot of each new token, -1 for padding
    q_indptr: [batch + 1], int32
    q_pos: [batch * num_new], int32 — the new tokens' positions
    """

    slots: torch.Tensor
    q_indptr: torch.Tensor
    q_pos: torch.Tensor
    segments: SegmentTable
    plans: dict[Any, Any] = field(default_factory=dict)  # kvfuse plans made by the first layer, reused
    before: dict[Any, Any] = field(default_factory=dict)  # the previous step's plans (each new plan extends its own)


class PagedRows:
    """Pages for ``batch`` rows in per-layer pools: the rows' own pools, which grow
    (doubling) as rows grow, or a ``TieredStore``'s device pool, whose pages the store lends.
    Each row attends over its ``prefix`` segments (stored chunks, pinned by their owner)
    and then its live segment (the tokens fed so far).

    k[layer], v[layer]: [num_pages, PAGE_SIZE, num_kv_heads, head_dim], the model's dtype
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        store: Any = None,
    ) -> None:
        self.shape = (PAGE_SIZE, num_kv_heads, head_dim)
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.store = store
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if store is not None:
            if store.pool.namespace.page_size != PAGE_SIZE:
                raise InvalidValueError("store", f"a pool of {PAGE_SIZE}-token pages", store.pool.namespace.page_size)
            self.k = [store.pool.k[i] for i in range(num_layers)]
            self.v = [store.pool.v[i] for i in range(num_layers)]
        self.free: list[int] = []
        self.pages: list[list[int]] = []  # per row: its live pages
        self.length: list[int] = []  # real tokens stored per row
        self.start: list[int | None] = []  # position of each row's first real token
        self.prefix: list[list[tuple[list[int], int, int]]] = []  # per row: (pages, length, pos)

    def with_prefix(self, segments: list[tuple[list[int], int, int]]) -> None:
        """One row that attends first over ``segments`` (pages it does not own), its live
        tokens starting right after the last one."""
        self.pages, self.length, self.prefix = [[]], [0], [list(segments)]
        self.start = [max((pos + n for _, n, pos in segments), default=0)]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def _grow(self, need: int) -> None:
        """Pools of at least ``need`` pages, with room to decode: 64 pages (1024 tokens)
        past a prefill's need, doubling after that (growing copies every layer's pools)."""
        old = self.num_pages
        new = max(need + 64, 2 * old)
        for kv in (self.k, self.v):
            for i in range(self.num_layers):
                grown = torch.zeros((new, *self.shape), dtype=self.dtype, device=self.device)
                if old:
                    grown[:old] = kv[i]
                if len(kv) > i:
                    kv[i] = grown
                else:
                    kv.append(grown)
        self.free.extend(range(new - 1, old - 1, -1))

    def _alloc(self, n: int) -> list[int]:
        if self.store is not None:
            pages: list[int] = self.store.allocate(n * PAGE_SIZE)
            return pages
        if n > len(self.free):
            self._grow(self.num_pages - len(self.free) + n)
        return [self.free.pop() for _ in range(n)]

    def release(self) -> None:
        """Give every live page back (the rows are gone)."""
        for row in self.pages:
            if self.store is not None:
                self.store.release(row)
            else:
                self.free.extend(row)
        self.pages, self.length, self.start, self.prefix = [], [], [], []

    def split_tables(self) -> tuple[SegmentTable, SegmentTable]:
        """(every row's prefix segments, every row's live segment): the two halves of a
        step's table, for attention computed in two parts and merged."""
        batch = len(self.pages)
        prefix = SegmentTable.from_lists([self.prefix[b] for b in range(batch)], device=self.device)
        live = SegmentTable.from_lists(
            [[(self.pages[b], self.length[b], self.start[b] or 0)] for b in range(batch)], device=self.device
        )
        return prefix, live

    def adopt(self, pages: list[int]) -> None:
        """One row whose tokens go into ``pages``, lent by the caller (``take`` hands them
        back before ``release`` could free them); it keeps the prefix ``with_prefix`` set."""
        prefix = self.prefix[0] if self.prefix else []
        start = max((pos + n for _, n, pos in prefix), default=None)
        self.pages, self.length, self.start, self.prefix = [list(pages)], [0], [start], [list(prefix)]

    def take(self, row: int = 0) -> tuple[list[int], int]:
        """Hand row ``row``'s live pages and token count to the caller (e.g. to commit
        them to a store as a chunk); the row keeps nothing."""
        pages, n = self.pages[row], self.length[row]
        self.pages[row], self.length[row] = [], 0
        return pages, n

    def step(self, valid: torch.Tensor, positions: torch.Tensor) -> Step:
        """Plan a step of ``valid.shape[1]`` new tokens per row: lend pages to the real ones.

        valid: [batch, num_new], bool — False for padding
        positions: [batch, num_new], int64 — each new token's position
        """
        batch, num_new = valid.shape
        if not self.pages:
            self.pages = [[] for _ in range(batch)]
            self.length, self.start, self.prefix = [0] * batch, [None] * batch, [[] for _ in range(batch)]
        if batch != len(self.pages):
            raise InvalidValueError("input_ids", f"a batch of {len(self.pages)} rows (this cache's)", batch)
        valid_h, pos_h = valid.cpu(), positions.cpu()
        slots = torch.full((batch, num_new), -1, dtype=torch.int64)
        for b in range(batch):
            real = pos_h[b][valid_h[b]]
            n = int(real.numel())
            if n == 0:
                continue
            start = self.start[b]
            if start is None:
                start = self.start[b] = int(real[0])
            want = torch.arange(start + self.length[b], start + self.length[b] + n)
            if not torch.equal(real, want):
                raise InvalidValueError(
                    "position_ids", f"consecutive positions from {int(want[0])} for row {b}", real.tolist()[:8]
                )
            first, total = self.length[b], self.length[b] + n
            need = -(-total // PAGE_SIZE) - len(self.pages[b])
            if need > 0:
                self.pages[b] += self._alloc(need)
            idx = torch.arange(first, total)
            row_pages = torch.tensor(self.pages[b], dtype=torch.int64)
            slots[b, valid_h[b]] = row_pages[idx // PAGE_SIZE] * PAGE_SIZE + idx % PAGE_SIZE
            self.length[b] = total
        table = SegmentTable.from_lists(
            [[*self.prefix[b], (self.pages[b], self.length[b], self.start[b] or 0)] for b in range(batch)],
            device=self.device,
        )
        return Step(
            slots.reshape(-1).to(self.device),
            torch.arange(0, (batch + 1) * num_new, num_new, dtype=torch.int32, device=self.device),
            positions.reshape(-1).to(dtype=torch.int32, device=self.device),
            table,
        )
