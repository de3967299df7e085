"""SegmentTable: the KV a request attends to, as position-tagged segments of pages (CSR)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from kvfuse._errors import ShapeError
from kvfuse.ops import _checks as check

T = TypeVar("T")


class Segment(NamedTuple):
    """One segment for :meth:`SegmentTable.from_lists`: its pages, valid tokens, first position."""

    pages: Sequence[int]
    length: int
    pos: int


class FlatSegments(NamedTuple):
    """Every KV token of a table, flattened in request order (see :meth:`SegmentTable.flatten`).

    kv_indptr: [batch + 1], int64 — tokens of request b are ``kv_indptr[b]:kv_indptr[b+1]``
    slots: [num_kv_tokens], int64 — slot of each token (page * page_size + row)
    k_pos: [num_kv_tokens], int64 — position of each token
    """

    kv_indptr: torch.Tensor
    slots: torch.Tensor
    k_pos: torch.Tensor


@dataclass(frozen=True)
class SegmentTable:
    """A batch of requests' KV as ordered, position-tagged segments of pages.

    Token t of segment s is in page ``page_indices[page_indptr[s] + t // page_size]``, row
    ``t % page_size``, at position ``seg_pos[s] + t``. Build one with :meth:`from_lists`.

    seg_indptr: [batch + 1], int32 — request b owns segments ``seg_indptr[b]:seg_indptr[b+1]``
    page_indptr: [num_segments + 1], int32 — segment s owns ``page_indices[page_indptr[s]:page_indptr[s+1]]``
    page_indices: [nnz_pages], int32 — page ids into the pool, in token order
    seg_len: [num_segments], int32 — valid tokens of each segment
    seg_pos: [num_segments], int32 — position of each segment's first token
    """

    seg_indptr: torch.Tensor
    page_indptr: torch.Tensor
    page_indices: torch.Tensor
    seg_len: torch.Tensor
    seg_pos: torch.Tensor

    @classmethod
    def from_lists(
        cls,
        requests: Sequence[Sequence[Segment | tuple[Sequence[int], int, int]]],
        *,
        device: torch.device | str = "cpu",
    ) -> SegmentTable:
        """Build a table from, per request, a list of ``(pages, length, pos)`` segments.

        >>> SegmentTable.from_lists([[([3, 7], 20, 100), ([], 0, 0)], [([1], 5, 0)]])
        """
        seg_indptr: list[int] = [0]
        page_indptr: list[int] = [0]
        page_indices: list[int] = []
        seg_len: list[int] = []
        seg_pos: list[int] = []
        for request in requests:
            for pages, length, pos in request:
                page_indices.extend(int(p) for p in pages)
                page_indptr.append(len(page_indices))
                seg_len.append(int(length))
                seg_pos.append(int(pos))
            seg_indptr.append(len(seg_len))

        def i32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(i32(seg_indptr), i32(page_indptr), i32(page_indices), i32(seg_len), i32(seg_pos))

    def contiguous(self) -> SegmentTable:
        """The same table with every index tensor contiguous (itself if they all are)."""
        fields = (self.seg_indptr, self.page_indptr, self.page_indices, self.seg_len, self.seg_pos)
        if all(t.is_contiguous() for t in fields):
            return self
        return type(self)(*(t.contiguous() for t in fields))

    @property
    def batch(self) -> int:
        return int(self.seg_indptr.shape[0]) - 1

    @property
    def num_segments(self) -> int:
        return int(self.seg_len.shape[0])

    @property
    def device(self) -> torch.device:
        return self.seg_indptr.device

    def to(self, device: torch.device | str) -> SegmentTable:
        """The same table with every field on ``device``."""
        return SegmentTable(*(getattr(self, f).to(device) for f in _FIELDS))

    def flatten(self, page_size: int) -> FlatSegments:
        """Slot and position of every KV token, request by request, vectorised (no Python
        loop per token). Fields are int64 on the table's device."""
        seg_len = self.seg_len.long()
        total = int(seg_len.sum())
        seg_start = torch.cumsum(seg_len, 0) - seg_len  # first flat token of each segment
        seg_of_tok = torch.repeat_interleave(torch.arange(self.num_segments, device=self.device), seg_len)
        t = torch.arange(total, device=self.device) - seg_start[seg_of_tok]  # token index within segment
        page = self.page_indices.long()[self.page_indptr.long()[seg_of_tok] + t // page_size]
        slots = page * page_size + t % page_size
        k_pos = self.seg_pos.long()[seg_of_tok] + t
        tok_indptr = torch.cat([seg_start, seg_start.new_tensor([total])])
        kv_indptr = tok_indptr[self.seg_indptr.long()]
        return FlatSegments(kv_indptr, slots, k_pos)

    def memo(self, key: tuple[object, ...], make: Callable[[], T]) -> T:
        """``make()``: what a device derives from this table and ``key`` (index lists,
        gathered table rows, per-request paths). A planned table (``kvfuse.plan_attention``)
        keeps the result for the plan's lifetime, so every layer's run reuses it; a one-shot
        call's table derives it again, through the same code, so both paths compute the
        same values. ``key`` names everything the result depends on besides the table;
        tensors in it count by identity and version (an in-place write is a new key)."""
        return make()

    def carried(self) -> dict[object, Any] | None:
        """Device state carried along a chain of plans (``kvfuse.plan_attention(...,
        extends=previous)``): one dict shared by a plan and every plan that extends it, for
        what a device may keep between forward steps (the cpu device: each layer's
        gathered, rotated keys of a decode request). ``None`` for a one-shot call's table.
        A device must check that what it kept still describes the new plan's keys (slots
        and positions), and recompute what does not."""
        return None

    def validate(self, *, batch: int, num_pages: int, page_size: int, device: torch.device) -> int:
        """Check every field against CONTRACTS.md; raises a ContractError naming the field.

        Reads the fields on the host once (one copy each from a GPU). Returns the largest
        key position in the table, -1 if it has no tokens.
        """
        for f in _FIELDS:
            t = check.shape(f"segments.{f}", getattr(self, f), [_LAYOUT[f]])
            check.dtype(f"segments.{f}", t, torch.int32)
            check.on_device(f"segments.{f}", t, device, "q")
        nseg = self.num_segments
        check.shape("segments.seg_indptr", self.seg_indptr, ["batch + 1"], [batch + 1])
        check.shape("segments.page_indptr", self.page_indptr, ["num_segments + 1"], [nseg + 1])
        check.shape("segments.seg_pos", self.seg_pos, ["num_segments"], [nseg])
        h = {f: check.host(getattr(self, f)).long() for f in _FIELDS}
        check.non_decreasing("segments.seg_indptr", h["seg_indptr"], 0, nseg)
        check.non_decreasing("segments.page_indptr", h["page_indptr"], 0, int(h["page_indices"].shape[0]))
        check.index_range("segments.page_indices", h["page_indices"], 0, num_pages)
        check.index_range("segments.seg_pos", h["seg_pos"], 0, 2**31 - 1)
        seg_len = h["seg_len"]
        check.index_range("segments.seg_len", seg_len, 0, 2**31 - 1)
        pages = h["page_indptr"].diff()
        bad = ((seg_len > pages * page_size) | (seg_len <= (pages - 1) * page_size)).nonzero()
        if bad.numel():
            s = int(bad[0, 0])
            raise ShapeError(
                "segments.seg_len",
                f"(pages - 1) * page_size < seg_len <= pages * page_size (page_size = {page_size}), or 0 with 0 pages",
                f"seg_len {int(seg_len[s])} with {int(pages[s])} pages in segment {s}",
            )
        last = h["seg_pos"] + seg_len - 1
        check.index_range("segments.seg_pos + seg_len", last, -1, 2**31 - 1)
        last = last[seg_len > 0]  # empty segments hold no key
        return int(last.max()) if last.numel() else -1


_FIELDS = ("seg_indptr", "page_indptr", "page_indices", "seg_len", "seg_pos")
_LAYOUT = {
    "seg_indptr": "batch + 1",
    "page_indptr": "num_segments + 1",
    "page_indices": "nnz_pages",
    "seg_len": "num_segments",
    "seg_pos": "num_segments",
}
