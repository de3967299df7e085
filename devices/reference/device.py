"""ReferenceDevice: runs every op through the references in ``kvfuse.ops`` (float64 math,
plain torch indexing for moves). Slow, exact, and available everywhere torch runs."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import torch
from kvfuse import Availability, Capabilities, Device, RopeConfig, SegmentTable, TransferHandle
from kvfuse.ops import _attention, _blend, _merge, _moves, _rope

_copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-reference-copy")


class ReferenceDevice(Device):
    name = "reference"
    vendor = "kvfuse (pure torch)"
    api_version = "1.0"
    torch_device_type = "cpu"
    priority = 0

    def probe(self) -> Availability:
        return Availability(available=True, reason="pure torch; runs wherever torch runs", mode="float64")

    def capabilities(self) -> Capabilities:
        return Capabilities.full(reach=("cpu",))

    def fusion_attention(
        self,
        q: torch.Tensor,
        q_indptr: torch.Tensor,
        q_pos: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        segments: SegmentTable,
        *,
        causal: bool,
        sm_scale: float,
        softcap: float,
        window_left: int,
        rope: RopeConfig | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _attention.fusion_attention_reference(
            q,
            q_indptr,
            q_pos,
            k_pages,
            v_pages,
            segments,
            causal=causal,
            sm_scale=sm_scale,
            softcap=softcap,
            window_left=window_left,
            rope=rope,
        )
        return out.to(q.dtype), lse.float()

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _merge.merge_states_reference(states)
        return out.to(states[0][0].dtype), lse.float()

    def rope_rerotate(
        self, k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig
    ) -> torch.Tensor:
        return _rope.rope_rerotate_reference(k, old_pos, new_pos, rope).to(k.dtype)

    def blend_select(
        self, k_stored: torch.Tensor, k_fresh: torch.Tensor, count: int, always: torch.Tensor | None
    ) -> torch.Tensor:
        return _blend.blend_select_reference(k_stored, k_fresh, count, always)

    def append_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        _moves.append_kv_reference(k, v, k_pages, v_pages, slot_mapping)

    def gather_pages(
        self,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
        *,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_buf, v_buf = _moves.gather_pages_reference(k_pages, v_pages, page_ids)
        if out is None:
            return k_buf, v_buf
        out[0].copy_(k_buf)
        out[1].copy_(v_buf)
        return out

    def scatter_pages(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
    ) -> None:
        _moves.scatter_pages_reference(k_buf, v_buf, k_pages, v_pages, page_ids)

    def copy_pages(
        self,
        src_k: torch.Tensor,
        src_v: torch.Tensor,
        src_ids: torch.Tensor,
        dst_k: torch.Tensor,
        dst_v: torch.Tensor,
        dst_ids: torch.Tensor,
        *,
        non_blocking: bool,
    ) -> TransferHandle:
        ids = dst_ids.tolist()
        if not non_blocking:
            _moves.copy_pages_reference(src_k, src_v, src_ids, dst_k, dst_v, dst_ids)
            return TransferHandle(ids)
        future = _copier.submit(_moves.copy_pages_reference, src_k, src_v, src_ids, dst_k, dst_v, dst_ids)
        return TransferHandle(ids, future)
