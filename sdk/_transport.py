"""Page transports: move KV pages from one process's pool to another's (prefill worker →
decode worker). A transport is provided by a plugin through the ``kvfuse_transports`` hook,
like devices, so another engine (NIXL, ...) is one plugin away.

The receiving side registers its pool and hands the sender a :class:`PoolDescriptor`
(JSON-able, sent out of band); the sender calls :meth:`Transport.send_pages`. Destination
pages are only valid once the returned :class:`TransferHandle` completes without error:
a receiver marks them valid when the sender tells it so, never before.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, TypedDict

import torch
from kvfuse._errors import TransferError

if TYPE_CHECKING:
    from kvfuse.ops import TransferHandle


class PoolDescriptor(TypedDict):
    """Where a registered pool lives, for a peer to write into."""

    transport: str
    session: str  # how peers reach this process
    k_addr: int
    v_addr: int
    page_bytes: int
    num_pages: int


class Transport(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def register_pool(self, k_pages: torch.Tensor, v_pages: torch.Tensor) -> PoolDescriptor:
        """Make ``k_pages``/``v_pages`` ([num_pages, page_size, num_kv_heads, head_dim],
        contiguous) reachable by peers; returns their descriptor."""

    @abc.abstractmethod
    def send_pages(
        self,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        src_ids: list[int],
        peer: PoolDescriptor,
        dst_ids: list[int],
        *,
        non_blocking: bool = False,
    ) -> TransferHandle:
        """Write pages ``src_ids`` of the local (registered) pool into pages ``dst_ids`` of
        the peer's pool. ``wait()`` raises TransferError naming the pages that failed."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the engine's resources."""


def check_timeout(timeout: float) -> float:
    """A transport's ``timeout``: seconds, finite and above zero; else a TransferError
    naming it, before the transport takes any resource."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise TransferError(f"timeout: expected seconds above zero, got {timeout!r}")
    return float(timeout)


def page_bytes(pages: torch.Tensor) -> int:
    """Bytes of one page of a pool.

    pages: [num_pages, page_size, num_kv_heads, head_dim], any dtype
    """
    return pages[0].numel() * pages.element_size()


def check_send(k_pages: torch.Tensor, src_ids: list[int], peer: PoolDescriptor, dst_ids: list[int]) -> int:
    """A send's arguments, checked before any byte moves: the pages' size equal on both
    sides, as many sources as destinations, every id in its pool, no destination twice.
    Returns the page's bytes; otherwise a TransferError that names the argument at fault
    and every destination page."""
    page = page_bytes(k_pages)
    if page != peer["page_bytes"]:
        there = peer["page_bytes"]
        raise TransferError(f"peer: page geometry differs: {page} bytes here, {there} at the peer", dst_ids)
    if len(src_ids) != len(dst_ids):
        raise TransferError(f"dst_ids: different lengths: {len(dst_ids)} ids for {len(src_ids)} src_ids", dst_ids)
    for name, ids, top in (("src_ids", src_ids, k_pages.shape[0]), ("dst_ids", dst_ids, peer["num_pages"])):
        bad = [i for i in ids if not 0 <= i < top]
        if bad:
            raise TransferError(f"{name}: page ids out of range [0, {top}): {bad[:8]}", dst_ids)
    if len(set(dst_ids)) != len(dst_ids):
        raise TransferError("dst_ids: a destination page repeated", dst_ids)
    return page
