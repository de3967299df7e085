"""KV moves on host memory: page moves through ``rows.c`` (the ``_rows`` extension, built
at install where a C compiler is), split over torch's own OpenMP team; else vectorised
torch (one index_select / index_copy_ per tensor, and copy_pages as a gather into a
cache-sized stage and a scatter out of it). Without the team (no OpenMP runtime to
join), copy_pages still takes ``rows.c`` on Python threads, and gather and scatter take
torch: on Python threads the C kernel scattered slower than torch, since torch's OpenMP
workers spin after each op on the cores those threads need.

Moves are bit copies, so rows (pages or tokens) move as the widest words their size and
alignment allow: 128 bits (complex128), else 64 (int64). torch's index_copy_ copies a row
element by element, so it runs compute-bound below the memory's speed on narrow ones:
bf16 takes about twice as long as int64 on the same bytes, and int64 about 1.4 times as
long as complex128 (measured with the cache flushed, 1024 pages of 64 KiB). A
complex128 load and store is a bit copy on x86-64 and Arm (SSE / NEON moves never quiet
a NaN); the tests move signalling NaNs with payloads and random bits.
"""

from __future__ import annotations

import concurrent.futures
import math
import os

import numpy as np
import torch
from kvfuse import IndexRangeError

try:
    from kvfuse.devices.cpu import _rows  # type: ignore[attr-defined]
except ImportError:  # installed without a C compiler
    _rows = None


def _openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch loaded (libgomp, or Intel's libiomp5, which
    has GOMP_parallel too), from this process's memory map; None where there is none."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/lib" in line and ("gomp" in line or "iomp" in line)}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    return min(paths, key=lambda p: (not p.startswith(torch_dir), p), default=None)  # torch's own first


def _use_team() -> bool:
    """Whether copy_rows splits its rows over torch's OpenMP team (see rows.c); else
    ``_copy_rows`` splits them over Python threads (``_copiers``)."""
    path = _openmp_runtime() if _rows is not None else None
    return path is not None and bool(_rows.use_openmp(path))


TEAM = _use_team()

PART_BYTES = 1 << 20  # the least work worth handing to another thread
_copiers = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="kvfuse-rows")
WORDS = {16: torch.complex128, 8: torch.int64}  # bytes -> the word type, widest first


def _width(t: torch.Tensor) -> int:
    """Bytes of the widest word whose size divides ``t``'s rows and address (0: none, or
    ``t`` is not contiguous rows)."""
    if t.dim() < 2 or t.numel() == 0 or not t.is_contiguous():
        return 0
    row = t[0].numel() * t.element_size()
    return next((w for w in WORDS if row % w == 0 and t.data_ptr() % w == 0), 0)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``a`` and ``b`` as ``[rows, words]`` over the same memory, in the widest word both
    allow, if any."""
    width = min(_width(a), _width(b))
    if not width:
        return None
    return a.view(a.shape[0], -1).view(WORDS[width]), b.view(b.shape[0], -1).view(WORDS[width])


def _select(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = src[ids[i]]``."""
    words = _pair(src, out)
    if words is not None:
        torch.index_select(words[0], 0, ids, out=words[1])
    else:
        torch.index_select(src, 0, ids, out=out)


def _put(dst: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[ids[i]] = src[i]``."""
    words = _pair(dst, src)
    if words is not None:
        words[0].index_copy_(0, ids, words[1])
    else:
        dst.index_copy_(0, ids, src)


def append_kv(
    k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0
    if bool(keep.all()):
        slots, k_rows, v_rows = slot_mapping, k, v
    else:
        slots, k_rows, v_rows = slot_mapping[keep], k[keep], v[keep]
    _put(k_pages.view(-1, *k_pages.shape[2:]), slots, k_rows)
    _put(v_pages.view(-1, *v_pages.shape[2:]), slots, v_rows)


def gather_pages(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Into ``out`` (already mapped: the memory's speed) or new buffers (a page fault per
    4 KiB on first touch: about a sixth of it on this VM)."""
    ids = page_ids.to(torch.int64)
    if out is not None:
        k_buf, v_buf = out
    else:
        k_buf, v_buf = (torch.empty((ids.numel(), *p.shape[1:]), dtype=p.dtype) for p in (k_pages, v_pages))
    if TEAM and _one_row(k_pages, v_pages, k_buf, v_buf):
        _copy_rows((k_pages, v_pages, k_buf, v_buf), ids, None)
        return k_buf, v_buf
    _select(k_pages, ids, k_buf)
    _select(v_pages, ids, v_buf)
    return k_buf, v_buf


def scatter_pages(
    k_buf: torch.Tensor, v_buf: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> None:
    ids = page_ids.to(torch.int64)
    if TEAM and _one_row(k_buf, v_buf, k_pages, v_pages):
        _copy_rows((k_buf, v_buf, k_pages, v_pages), None, ids)
        return
    _put(k_pages, ids, k_buf)
    _put(v_pages, ids, v_buf)


CHUNK_BYTES = 8 << 20  # staging buffer of copy_pages: L3-sized, no full-size temporary


def copy_pages(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_ids: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_ids: torch.Tensor,
) -> None:
    """One pass through ``_rows`` between host pools; else gather into a cache-sized
    staging buffer and scatter from it, chunk by chunk (a full-size temporary would cost a
    page fault per 4 KiB and halve the bandwidth)."""
    pools = (src_k, src_v, dst_k, dst_v)
    if _rows is not None and _one_row(*pools):
        _copy_rows(pools, src_ids, dst_ids)
        return
    src, dst = src_ids.to(torch.int64), dst_ids.to(torch.int64)
    page_bytes = src_k[0].numel() * src_k.element_size()
    chunk = max(1, CHUNK_BYTES // page_bytes)
    stage = torch.empty((min(chunk, src.numel()), *src_k.shape[1:]), dtype=src_k.dtype)
    for src_pool, dst_pool in ((src_k, dst_k), (src_v, dst_v)):
        for i in range(0, src.numel(), chunk):
            part = stage[: min(chunk, src.numel() - i)]
            _select(src_pool, src[i : i + chunk], part)
            _put(dst_pool, dst[i : i + chunk], part.to(dst_pool.device))


def _host_row(t: torch.Tensor) -> int:
    """Bytes per page of ``t`` if it is a contiguous host pool, else 0."""
    if t.device.type != "cpu" or t.dim() < 2 or not t.is_contiguous():
        return 0
    return math.prod(t.shape[1:]) * t.element_size()


def _one_row(*ts: torch.Tensor) -> bool:
    """``ts`` are contiguous host pools or buffers with rows (pages) of one size: what
    ``_rows`` moves."""
    return len({_host_row(t) for t in ts}) == 1 and _host_row(ts[0]) > 0


def _copy_rows(pools: tuple[torch.Tensor, ...], src_ids: torch.Tensor | None, dst_ids: torch.Tensor | None) -> None:
    """Rows ``src_ids`` of the sources into rows ``dst_ids`` of the destinations (None:
    rows 0, 1, ... of a buffer) by ``_rows.copy_rows``, the pages split into one part per
    intra-op thread: over torch's OpenMP team (``TEAM``), else over Python threads, the
    caller copying the first part. The ids become addresses, so they are checked here too:
    an id out of range is an IndexRangeError before any byte moves.

    pools: src_k, src_v, dst_k, dst_v: [num_pages, page_size, num_kv_heads, head_dim] (or
    [n, ...] buffers), contiguous, on the cpu, pages of one size
    """
    src_k, src_v, dst_k, dst_v = pools
    row = _host_row(src_k)
    n = (src_ids if src_ids is not None else dst_ids).numel()  # type: ignore[union-attr]
    ids = []
    for name, t, pair in (("src_ids", src_ids, (src_k, src_v)), ("dst_ids", dst_ids, (dst_k, dst_v))):
        t = torch.arange(n) if t is None else t.to(torch.int64).contiguous()
        top = min(p.shape[0] for p in pair)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= top):
            raise IndexRangeError(name, f"page ids in [0, {top})", f"ids from {int(t.min())} to {int(t.max())}")
        ids.append(t)
    if n == 0:
        return
    parts = max(1, min(torch.get_num_threads(), 2 * n * row // PART_BYTES))
    if TEAM:
        for s, d in ((src_k, dst_k), (src_v, dst_v)):
            _rows.copy_rows(d.data_ptr(), ids[1].data_ptr(), s.data_ptr(), ids[0].data_ptr(), 0, n, row, parts)
        return

    def part(i: int) -> None:
        lo, hi = n * i // parts, n * (i + 1) // parts
        for s, d in ((src_k, dst_k), (src_v, dst_v)):
            _rows.copy_rows(d.data_ptr(), ids[1].data_ptr(), s.data_ptr(), ids[0].data_ptr(), lo, hi, row)

    others = [_copiers.submit(part, i) for i in range(1, parts)]
    try:
        part(0)
    finally:
        for f in others:
            f.result()


def extent(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to the end of its last (0 when empty)."""
    if t.numel() == 0 or t.is_contiguous():
        return t.numel() * t.element_size()
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def copy_spans(pairs: list[tuple[torch.Tensor, torch.Tensor]], spans: np.ndarray, *, team: bool) -> bool:
    """Byte spans between ``(dst, src)`` pairs: ``spans[i] = (pair, dst offset, src
    offset, length)``, offsets from each tensor's first element. One pass of
    ``_rows.copy_spans``, split over torch's OpenMP team when ``team`` (the calling
    thread's own team; on a thread of many, such as the store's movers, pass False).
    False where there is no kernel (the caller copies another way). The kernel checks
    every span against its pair's tensors before any byte moves: one outside them is an
    IndexRangeError naming ``spans``.

    pairs: (dst, src) host tensors, any shape and dtype (bytes are copied as they are;
        a span's source and destination bytes must not overlap)
    spans: [n, 4], int64
    """
    if _rows is None or not all(d.is_cpu and s.is_cpu for d, s in pairs):
        return False
    table = np.array([(d.data_ptr(), extent(d), s.data_ptr(), extent(s)) for d, s in pairs], dtype=np.int64)
    spans = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 4)
    threads = torch.get_num_threads() if team and TEAM else 1
    bad = _rows.copy_spans(table.ctypes.data, len(table), spans.ctypes.data, len(spans), threads)
    if bad >= 0:
        p = int(spans[bad, 0])
        room = f"{table[p, 1]} B and {table[p, 3]} B" if 0 <= p < len(table) else f"one of {len(table)} pairs"
        raise IndexRangeError(
            "spans", f"(pair, dst offset, src offset, length >= 0) within {room}", f"span {bad}: {spans[bad].tolist()}"
        )
    return True
