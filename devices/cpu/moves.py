"""KV moves on host memory, vectorised torch (one index_select / index_copy_ per tensor).

Moves are bit copies, so rows (pages or tokens) move as 64-bit words where their size and
alignment allow: torch's bf16 index_copy_ takes about twice as long as int64 on the same bytes.
"""

from __future__ import annotations

import torch


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """Contiguous ``t`` as ``[rows, words]`` int64 over the same memory, if its rows allow."""
    if t.dim() < 2 or t.numel() == 0 or not t.is_contiguous():
        return None
    if t[0].numel() * t.element_size() % 8 or t.data_ptr() % 8:
        return None
    return t.view(t.shape[0], -1).view(torch.int64)


def _select(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = src[ids[i]]``."""
    ws, wo = _words(src), _words(out)
    if ws is not None and wo is not None:
        torch.index_select(ws, 0, ids, out=wo)
    else:
        torch.index_select(src, 0, ids, out=out)


def _put(dst: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[ids[i]] = src[i]``."""
    wd, ws = _words(dst), _words(src)
    if wd is not None and ws is not None:
        wd.index_copy_(0, ids, ws)
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
    _select(k_pages, ids, k_buf)
    _select(v_pages, ids, v_buf)
    return k_buf, v_buf


def scatter_pages(
    k_buf: torch.Tensor, v_buf: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> None:
    ids = page_ids.to(torch.int64)
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
    """Gather into a cache-sized staging buffer and scatter from it, chunk by chunk: a
    full-size temporary would cost a page fault per 4 KiB and halve the bandwidth."""
    src, dst = src_ids.to(torch.int64), dst_ids.to(torch.int64)
    page_bytes = src_k[0].numel() * src_k.element_size()
    chunk = max(1, CHUNK_BYTES // page_bytes)
    stage = torch.empty((min(chunk, src.numel()), *src_k.shape[1:]), dtype=src_k.dtype)
    for src_pool, dst_pool in ((src_k, dst_k), (src_v, dst_v)):
        for i in range(0, src.numel(), chunk):
            part = stage[: min(chunk, src.numel() - i)]
            _select(src_pool, src[i : i + chunk], part)
            _put(dst_pool, dst[i : i + chunk], part.to(dst_pool.device))
