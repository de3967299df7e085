"""kvfuse ops: the contracts of CONTRACTS.md, validated once here and dispatched to a device.

Every op takes ``device=``: a device name, or None for ``KVFUSE_DEVICE``, else the
best available device for the tensors' torch device whose capabilities cover the call.

Dimension glossary (used in every docstring):

========================  ==================================================================
``batch``                 requests in the call
``num_q_tokens``          query tokens of all requests, packed
``num_q_heads``           query heads; a multiple of ``num_kv_heads``
``num_kv_heads``          key/value heads; q head h reads kv head h // (num_q_heads // num_kv_heads)
``head_dim``              channels per head
``num_pages``             pages in a pool
``page_size``             tokens per page
``num_segments``          segments of all requests
``nnz_pages``             page ids of all segments
``num_tokens``            tokens of a move or rope op
========================  ==================================================================

Index tensors are int32, except ``slot_mapping`` (int64). Float tensors of one call share
one dtype (fp32, fp16 or bf16); lse is always fp32, natural log.

Layout: pools (``k_pages``/``v_pages`` and the pools of moves) must be contiguous and are
rejected otherwise; every other tensor argument may be any strided view, and devices
receive its contiguous copy, so a view gives exactly the result of its contiguous copy.
"""

from __future__ import annotations

import typing

import torch
from kvfuse._registry import registry as _registry
from kvfuse.ops import _attention, _blend, _merge, _moves, _rope
from kvfuse.ops._blend import blend_count
from kvfuse.ops._dispatch import call as _call
from kvfuse.ops._dispatch import run as _run
from kvfuse.ops._dispatch import takes_keyword as _takes_keyword
from kvfuse.ops._moves import TransferHandle
from kvfuse.ops._plan import AppendPlan, AttentionPlan, plan_append, plan_attention
from kvfuse.ops._rope import RopeConfig
from kvfuse.ops._segments import FlatSegments, Segment, SegmentTable

if typing.TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "AppendPlan",
    "AttentionPlan",
    "FlatSegments",
    "RopeConfig",
    "Segment",
    "SegmentTable",
    "TransferHandle",
    "append_kv",
    "blend_count",
    "blend_select",
    "copy_pages",
    "fusion_attention",
    "gather_pages",
    "merge_states",
    "plan_append",
    "plan_attention",
    "rope_rerotate",
    "scatter_pages",
]


def fusion_attention(
    q: torch.Tensor,
    q_indptr: torch.Tensor,
    q_pos: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    segments: SegmentTable,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    softcap: float = 0.0,
    window_left: int = -1,
    rope: RopeConfig | None = None,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over the position-tagged segments of each request.

    Key j is visible to query i iff ``(not causal or k_pos[j] <= q_pos[i])`` and
    ``(window_left < 0 or q_pos[i] - k_pos[j] <= window_left)``: causality is by position.
    ``score = sm_scale * q·k`` (default ``head_dim ** -0.5``), then
    ``softcap * tanh(score / softcap)`` if ``softcap > 0``. With ``rope``, q and the pooled
    keys are un-rotated and are rotated at their positions inside the op.

    Args:
        q: [num_q_tokens, num_q_heads, head_dim], fp32/fp16/bf16
        q_indptr: [batch + 1], int32 — queries of request b are ``q[q_indptr[b]:q_indptr[b+1]]``
        q_pos: [num_q_tokens], int32 — absolute position of each query token
        k_pages: [num_pages, page_size, num_kv_heads, head_dim], q.dtype, contiguous
        v_pages: [num_pages, page_size, num_kv_heads, head_dim], q.dtype, contiguous
        segments: the KV segments of each request (:class:`SegmentTable`)

    Returns:
        out: [num_q_tokens, num_q_heads, head_dim], q.dtype — 0 for a query with no visible key
        lse: [num_q_tokens, num_q_heads], fp32 — natural log; -inf for a query with no visible key
    """
    req, scale = _attention.check_fusion_attention(
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
    out: tuple[torch.Tensor, torch.Tensor] = _run(
        "fusion_attention",
        req,
        q.device,
        device,
        q.contiguous(),
        q_indptr.contiguous(),
        q_pos.contiguous(),
        k_pages,
        v_pages,
        segments.contiguous(),
        causal=causal,
        sm_scale=scale,
        softcap=float(softcap),
        window_left=window_left,
        rope=rope,
    )
    return out


def merge_states(
    states: Sequence[tuple[torch.Tensor, torch.Tensor]], *, device: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention states over disjoint key sets: ``lse = logsumexp_i(lse_i)``,
    ``out = sum_i exp(lse_i - lse) * out_i``; all ``-inf`` gives ``out = 0, lse = -inf``.

    Args:
        states: pairs ``(out_i, lse_i)`` with
            out_i: [num_q_tokens, num_q_heads, head_dim], fp32/fp16/bf16 and
            lse_i: [num_q_tokens, num_q_heads], fp32 — no NaN or +inf

    Returns:
        out: [num_q_tokens, num_q_heads, head_dim], dtype of out_i
        lse: [num_q_tokens, num_q_heads], fp32
    """
    req = _merge.check_merge_states(states)
    dense = [(o.contiguous(), lse.contiguous()) for o, lse in states]
    result: tuple[torch.Tensor, torch.Tensor] = _run("merge_states", req, states[0][0].device, device, dense)
    return result


def rope_rerotate(
    k: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    rope: RopeConfig,
    *,
    device: str | None = None,
) -> torch.Tensor:
    """Move rotated keys from old_pos to new_pos (for engines that store rotated keys).

    Args:
        k: [num_tokens, num_kv_heads, head_dim], fp32/fp16/bf16 — rotated at old_pos
        old_pos: [num_tokens], int32
        new_pos: [num_tokens], int32

    Returns:
        k': [num_tokens, num_kv_heads, head_dim], k.dtype — rotated at new_pos
    """
    req = _rope.check_rope_rerotate(k, old_pos, new_pos, rope)
    result: torch.Tensor = _run(
        "rope_rerotate", req, k.device, device, k.contiguous(), old_pos.contiguous(), new_pos.contiguous(), rope
    )
    return result


def blend_select(
    k_stored: torch.Tensor,
    k_fresh: torch.Tensor,
    ratio: float,
    *,
    always: torch.Tensor | None = None,
    device: str | None = None,
) -> torch.Tensor:
    """CacheBlend token selection: the ``ceil(ratio * num_tokens)`` tokens whose fresh keys
    deviate most from the stored ones (sum of squares in fp32; ties → lower index), plus
    ``always``, deduplicated and sorted.

    Args:
        k_stored: [num_tokens, num_kv_heads, head_dim], fp32/fp16/bf16
        k_fresh: [num_tokens, num_kv_heads, head_dim], k_stored.dtype
        ratio: in [0, 1]
        always: [m], int32/int64 — token indices always selected (e.g. the question)

    Returns:
        indices: [n], int64, ascending
    """
    req, count = _blend.check_blend_select(k_stored, k_fresh, ratio, always)
    dense = always.contiguous() if always is not None else None
    result: torch.Tensor = _run(
        "blend_select", req, k_stored.device, device, k_stored.contiguous(), k_fresh.contiguous(), count, dense
    )
    return result


def append_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    device: str | None = None,
) -> None:
    """Write token t's k/v to slot ``slot_mapping[t]`` (row ``slot % page_size`` of page
    ``slot // page_size``); negative slots are skipped. Bit-exact.

    Args:
        k: [num_tokens, num_kv_heads, head_dim], k_pages.dtype
        v: [num_tokens, num_kv_heads, head_dim], k_pages.dtype
        k_pages: [num_pages, page_size, num_kv_heads, head_dim], fp32/fp16/bf16 — written in place
        v_pages: [num_pages, page_size, num_kv_heads, head_dim], k_pages.dtype — written in place
        slot_mapping: [num_tokens], int64 — unique among non-negative values
    """
    req = _moves.check_append_kv(k, v, k_pages, v_pages, slot_mapping)
    _run(
        "append_kv",
        req,
        k_pages.device,
        device,
        k.contiguous(),
        v.contiguous(),
        k_pages,
        v_pages,
        slot_mapping.contiguous(),
    )


def gather_pages(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy pages out of a pool into contiguous buffers. Repeated ids are allowed. Bit-exact.

    Args:
        k_pages: [num_pages, page_size, num_kv_heads, head_dim], fp32/fp16/bf16
        v_pages: [num_pages, page_size, num_kv_heads, head_dim], k_pages.dtype
        page_ids: [n], int32
        out: (k_buf, v_buf) to write into, each [n, page_size, num_kv_heads, head_dim],
            k_pages.dtype, contiguous, on the pools' device, disjoint from each other and
            from the pools; checked before any write (a bad one is a ContractError naming
            it, and nothing is written). None: new buffers.

    Returns:
        k_buf: [n, page_size, num_kv_heads, head_dim], k_pages.dtype, contiguous (out[0] if given)
        v_buf: [n, page_size, num_kv_heads, head_dim], k_pages.dtype, contiguous (out[1] if given)
    """
    req = _moves.check_gather_pages(k_pages, v_pages, page_ids)
    ids = page_ids.contiguous()
    if out is None:
        result: tuple[torch.Tensor, torch.Tensor] = _run(
            "gather_pages", req, k_pages.device, device, k_pages, v_pages, ids
        )
        return result
    bufs = _moves.check_gather_out(out, int(ids.shape[0]), k_pages, v_pages)
    dev = _registry().select(req, k_pages.device, device)
    if _takes_keyword(dev, "gather_pages", "out"):  # the device writes the buffers itself
        _call(dev, "gather_pages", k_pages, v_pages, ids, out=bufs)
    else:  # a device without ``out``: its buffers, copied (nothing is written if it fails)
        k_buf, v_buf = _call(dev, "gather_pages", k_pages, v_pages, ids)
        bufs[0].copy_(k_buf)
        bufs[1].copy_(v_buf)
    return bufs


def scatter_pages(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    *,
    device: str | None = None,
) -> None:
    """Write buffers into pages of a pool, in place. Ids must be unique. Bit-exact.

    Args:
        k_buf: [n, page_size, num_kv_heads, head_dim], k_pages.dtype
        v_buf: [n, page_size, num_kv_heads, head_dim], k_pages.dtype
        k_pages: [num_pages, page_size, num_kv_heads, head_dim], fp32/fp16/bf16 — written in place
        v_pages: [num_pages, page_size, num_kv_heads, head_dim], k_pages.dtype — written in place
        page_ids: [n], int32
    """
    req = _moves.check_scatter_pages(k_buf, v_buf, k_pages, v_pages, page_ids)
    _run(
        "scatter_pages",
        req,
        k_pages.device,
        device,
        k_buf.contiguous(),
        v_buf.contiguous(),
        k_pages,
        v_pages,
        page_ids.contiguous(),
    )


def copy_pages(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_ids: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    non_blocking: bool = False,
    device: str | None = None,
) -> TransferHandle:
    """Copy pages between two pools, possibly on different devices or tiers. Bit-exact.

    The source is unchanged and destination pages not in ``dst_ids`` are untouched. With
    ``non_blocking=False`` the copy is complete on return.

    Args:
        src_k: [num_pages, page_size, num_kv_heads, head_dim], fp32/fp16/bf16
        src_v: [num_pages, page_size, num_kv_heads, head_dim], src_k.dtype
        src_ids: [n], int32 — may repeat
        dst_k: [num_pages_dst, page_size, num_kv_heads, head_dim], src_k.dtype — written in place
        dst_v: [num_pages_dst, page_size, num_kv_heads, head_dim], src_k.dtype — written in place
        dst_ids: [n], int32 — unique; disjoint from src_ids when src and dst are one pool

    Returns:
        a :class:`TransferHandle`
    """
    req = _moves.check_copy_pages(src_k, src_v, src_ids, dst_k, dst_v, dst_ids, non_blocking=non_blocking)
    primary = dst_k.device if src_k.device.type == "cpu" else src_k.device
    result: TransferHandle = _run(
        "copy_pages",
        req,
        primary,
        device,
        src_k,
        src_v,
        src_ids.contiguous(),
        dst_k,
        dst_v,
        dst_ids.contiguous(),
        non_blocking=non_blocking,
    )
    return result
