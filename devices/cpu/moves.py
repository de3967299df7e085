"""KV moves on host memory, vectorised torch (one index_select / index_copy_ per tensor)."""

from __future__ import annotations

import torch


def append_kv(
    k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0
    if bool(keep.all()):
        slots, k_rows, v_rows = slot_mapping, k, v
    else:
        slots, k_rows, v_rows = slot_mapping[keep], k[keep], v[keep]
    k_pages.view(-1, *k_pages.shape[2:]).index_copy_(0, slots, k_rows)
    v_pages.view(-1, *v_pages.shape[2:]).index_copy_(0, slots, v_rows)


def gather_pages(
    k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = page_ids.to(torch.int64)
    return torch.index_select(k_pages, 0, ids), torch.index_select(v_pages, 0, ids)


def scatter_pages(
    k_buf: torch.Tensor, v_buf: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
) -> None:
    ids = page_ids.to(torch.int64)
    k_pages.index_copy_(0, ids, k_buf)
    v_pages.index_copy_(0, ids, v_buf)


CHUNK_BYTES = 2 << 20  # staging buffer of copy_pages: cache-sized, reused, no page faults


def copy_pages(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_ids: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_ids: torch.Tensor,
) -> None:
    """Gather into a small reused staging buffer and scatter from it, chunk by chunk: a
    full-size temporary would cost a page fault per 4 KiB and halve the bandwidth."""
    src, dst = src_ids.to(torch.int64), dst_ids.to(torch.int64)
    page_bytes = src_k[0].numel() * src_k.element_size()
    chunk = max(1, CHUNK_BYTES // page_bytes)
    stage = torch.empty((min(chunk, src.numel()), *src_k.shape[1:]), dtype=src_k.dtype, device=src_k.device)
    for src_pool, dst_pool in ((src_k, dst_k), (src_v, dst_v)):
        for i in range(0, src.numel(), chunk):
            part = stage[: min(chunk, src.numel() - i)]
            torch.index_select(src_pool, 0, src[i : i + chunk], out=part)
            dst_pool.index_copy_(0, dst[i : i + chunk], part.to(dst_pool.device))
