"""KV moves: append_kv, gather_pages, scatter_pages, copy_pages. All bit-exact.

The references here are the definition: plain torch indexing, no arithmetic.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import torch
from kvfuse._device import Requirement, dtype_name
from kvfuse._errors import (
    IndexRangeError,
    InvalidValueError,
    ShapeError,
    TransferError,
    TransferTimeoutError,
)
from kvfuse.ops import _checks as check
from kvfuse.ops._attention import POOL_LAYOUT, check_pool

TOKENS_LAYOUT = ["num_tokens", "num_kv_heads", "head_dim"]
BUF_LAYOUT = ["n", "page_size", "num_kv_heads", "head_dim"]


class TransferHandle:
    """Completion of a :func:`kvfuse.ops.copy_pages` call.

    A device backs it with a ``concurrent.futures.Future`` (or subclasses it, overriding
    :meth:`done` and :meth:`_result`, e.g. around a CUDA event).
    """

    def __init__(self, dst_ids: Sequence[int], future: concurrent.futures.Future[None] | None = None) -> None:
        self.dst_ids = list(dst_ids)
        self._future = future

    def done(self) -> bool:
        """Whether the copy has finished (successfully or not). Never blocks."""
        return self._future is None or self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy has finished.

        Raises:
            TransferTimeoutError: not finished within ``timeout`` seconds.
            TransferError: the copy failed; ``failed_pages`` names the destination pages
                whose contents are not valid.
        """
        try:
            self._result(timeout)
        except TransferError:
            raise
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            raise TransferTimeoutError(f"copy of {len(self.dst_ids)} pages not finished after {timeout} s") from exc
        except Exception as exc:
            raise TransferError(f"copy failed: {type(exc).__name__}: {exc}", self.dst_ids) from exc

    def _result(self, timeout: float | None) -> None:
        if self._future is not None:
            self._future.result(timeout)


def _ids(name: str, ids: object, num_pages: int, pool: torch.Tensor, *, unique: bool) -> torch.Tensor:
    """``ids`` is ``[n]`` int32 page ids in range, on the pool's device or the CPU."""
    t = check.shape(name, ids, ["n"])
    check.dtype(name, t, torch.int32)
    if t.device.type != "cpu":
        check.on_device(name, t, pool.device, "its pool")
    check.index_range(name, t, 0, num_pages)
    if unique:
        check.unique(name, t)
    return t


def check_append_kv(
    k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> Requirement:
    """Validate a call; returns what it needs from a device."""
    num_pages, page_size, hkv, d = check_pool(k_pages, v_pages)
    check.shape("k", k, TOKENS_LAYOUT, [None, hkv, d])
    check.shape("v", v, TOKENS_LAYOUT, tuple(k.shape))
    for name, t in (("k", k), ("v", v)):
        check.same_dtype(name, t, "k_pages", k_pages)
        check.on_device(name, t, k_pages.device, "k_pages")
    check.shape("slot_mapping", slot_mapping, ["num_tokens"], [k.shape[0]])
    check.dtype("slot_mapping", slot_mapping, torch.int64)
    check.on_device("slot_mapping", slot_mapping, k_pages.device, "k_pages")
    slots = check.host(slot_mapping)
    live = slots[slots >= 0]
    check.index_range("slot_mapping", live, 0, num_pages * page_size)
    check.unique("slot_mapping", live)
    return Requirement(op="append_kv", dtype=dtype_name(k.dtype), head_dim=d, page_size=page_size)


def append_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Token t goes to row ``slot % page_size`` of page ``slot // page_size``; ``slot < 0`` skips."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    _, _, hkv, d = k_pages.shape
    k_pages.view(-1, hkv, d)[slots] = k[keep]
    v_pages.view(-1, hkv, d)[slots] = v[keep]


def check_gather_pages(k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor) -> Requirement:
    """Validate a call (repeated ids are allowed); returns what it needs from a device."""
    num_pages, page_size, _, d = check_pool(k_pages, v_pages)
    _ids("page_ids", page_ids, num_pages, k_pages, unique=False)
    return Requirement(op="gather_pages", dtype=dtype_name(k_pages.dtype), head_dim=d, page_size=page_size)


def check_gather_out(
    out: object, n: int, k_pages: torch.Tensor, v_pages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` of ``gather_pages``: two contiguous buffers of exactly
    ``[n, page_size, num_kv_heads, head_dim]`` in the pools' dtype and device, disjoint
    from each other and from both pools (a gather reads the pools while it writes out)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise InvalidValueError("out", "a (k_buf, v_buf) pair of tensors", type(out).__name__)
    bufs = []
    for name, t in (("out[0]", out[0]), ("out[1]", out[1])):
        x = check.shape(name, t, BUF_LAYOUT, [n, *k_pages.shape[1:]])
        check.same_dtype(name, x, "k_pages", k_pages)
        check.on_device(name, x, k_pages.device, "k_pages")
        check.contiguous(name, x)
        bufs.append(x)
    spans = [("out[0]", _span(bufs[0])), ("out[1]", _span(bufs[1]))]
    others = [("out[0]", _span(bufs[0])), ("k_pages", _span(k_pages)), ("v_pages", _span(v_pages))]
    for i, (name, (a0, a1)) in enumerate(spans):
        for other, (b0, b1) in others[: 1 if i == 1 else 0] + others[1:]:
            if a0 < b1 and b0 < a1 and a1 > a0:
                raise InvalidValueError(name, f"memory disjoint from {other}", "an overlapping view")
    return bufs[0], bufs[1]


def gather_pages_reference(
    k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns k_buf, v_buf: [n, page_size, num_kv_heads, head_dim], contiguous."""
    ids = page_ids.to(k_pages.device).long()
    return k_pages[ids].contiguous(), v_pages[ids].contiguous()


def check_scatter_pages(
    k_buf: torch.Tensor, v_buf: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> Requirement:
    """Validate a call (ids must be unique); returns what it needs from a device."""
    num_pages, page_size, hkv, d = check_pool(k_pages, v_pages)
    ids = _ids("page_ids", page_ids, num_pages, k_pages, unique=True)
    check.shape("k_buf", k_buf, BUF_LAYOUT, [ids.shape[0], page_size, hkv, d])
    check.shape("v_buf", v_buf, BUF_LAYOUT, tuple(k_buf.shape))
    for name, t in (("k_buf", k_buf), ("v_buf", v_buf)):
        check.same_dtype(name, t, "k_pages", k_pages)
        check.on_device(name, t, k_pages.device, "k_pages")
    return Requirement(op="scatter_pages", dtype=dtype_name(k_pages.dtype), head_dim=d, page_size=page_size)


def scatter_pages_reference(
    k_buf: torch.Tensor, v_buf: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> None:
    """Page ``page_ids[i]`` of the pool becomes ``k_buf[i]`` / ``v_buf[i]``."""
    ids = page_ids.to(k_pages.device).long()
    k_pages[ids] = k_buf
    v_pages[ids] = v_buf


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range a contiguous tensor occupies."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _page_clash(src: torch.Tensor, dst: torch.Tensor, s_ids: list[int], d_ids: list[int]) -> tuple[int, int] | None:
    """A (src page, dst page) pair whose memory overlaps, if the two contiguous pools share
    address space: decided by the byte ranges the pages occupy, not by storage identity, so
    two views into one buffer at any offset are caught."""
    if src.device != dst.device:
        return None
    (s0, s1), (d0, d1) = _span(src), _span(dst)
    if s1 <= d0 or d1 <= s0:
        return None
    page = src[0].numel() * src.element_size()
    sources = set(s_ids)
    for j in d_ids:
        off = d0 + j * page - s0  # byte offset of dst page j from src page 0
        for i in {off // page, -(-off // page)}:  # the src pages it touches (one if aligned)
            if i in sources:
                return i, j
    return None


def check_copy_pages(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_ids: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    non_blocking: bool,
) -> Requirement:
    """Validate a call; returns what it needs from a device (which torch devices it reaches)."""
    src_pages, page_size, hkv, d = check_pool(src_k, src_v, ("src_k", "src_v"))
    dst_pages = check_pool(dst_k, dst_v, ("dst_k", "dst_v"))[0]
    check.shape("dst_k", dst_k, POOL_LAYOUT, [None, page_size, hkv, d])
    check.same_dtype("dst_k", dst_k, "src_k", src_k)
    s_ids = _ids("src_ids", src_ids, src_pages, src_k, unique=False)
    d_ids = _ids("dst_ids", dst_ids, dst_pages, dst_k, unique=True)
    if s_ids.shape[0] != d_ids.shape[0]:
        raise ShapeError("dst_ids", f"as many ids as src_ids ({s_ids.shape[0]})", f"{d_ids.shape[0]} ids")
    s_list, d_list = check.host(s_ids).tolist(), check.host(d_ids).tolist()
    for s_name, s_pool, d_name, d_pool in (
        ("src_k", src_k, "dst_k", dst_k),
        ("src_k", src_k, "dst_v", dst_v),
        ("src_v", src_v, "dst_k", dst_k),
        ("src_v", src_v, "dst_v", dst_v),
    ):
        clash = _page_clash(s_pool, d_pool, s_list, d_list)
        if clash is not None:
            raise IndexRangeError(
                "dst_ids",
                "destination pages whose memory is disjoint from every source page",
                f"{d_name} page {clash[1]} overlaps {s_name} page {clash[0]}",
            )
    (k0, k1), (v0, v1) = _span(dst_k), _span(dst_v)
    if dst_k.device == dst_v.device and k0 < v1 and v0 < k1:
        raise InvalidValueError("dst_v", "memory disjoint from dst_k", "an overlapping view")
    if not isinstance(non_blocking, bool):
        raise InvalidValueError("non_blocking", "a bool", type(non_blocking).__name__)
    return Requirement(
        op="copy_pages",
        dtype=dtype_name(src_k.dtype),
        head_dim=d,
        page_size=page_size,
        features=frozenset({"non_blocking"} if non_blocking else set()),
        torch_device_types=frozenset({src_k.device.type, dst_k.device.type}),
    )


def copy_pages_reference(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_ids: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_ids: torch.Tensor,
) -> None:
    """Page ``dst_ids[i]`` of dst becomes page ``src_ids[i]`` of src; nothing else changes."""
    s = src_ids.to(src_k.device).long()
    d = dst_ids.to(dst_k.device).long()
    dst_k[d] = src_k[s].to(dst_k.device)
    dst_v[d] = src_v[s].to(dst_v.device)
