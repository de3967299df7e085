"""fusion_attention: attention of packed queries over position-tagged segments of paged KV.

For query i of request b, key j of request b is visible iff
``(not causal or k_pos[j] <= q_pos[i]) and (window_left < 0 or q_pos[i] - k_pos[j] <= window_left)``.
``score = sm_scale * q·k``, soft-capped if ``softcap > 0``; a query with no visible key
gets ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import torch
from kvfuse._device import Requirement, dtype_name
from kvfuse._errors import InvalidValueError
from kvfuse.ops import _checks as check
from kvfuse.ops._rope import RopeConfig, rotate
from kvfuse.ops._segments import SegmentTable

POOL_LAYOUT = ["num_pages", "page_size", "num_kv_heads", "head_dim"]


def check_pool(
    k_pages: object, v_pages: object, names: tuple[str, str] = ("k_pages", "v_pages")
) -> tuple[int, int, int, int]:
    """``k_pages``/``v_pages`` (arguments ``names``) form a valid contiguous pool; returns
    its geometry ``(num_pages, page_size, num_kv_heads, head_dim)``."""
    kn, vn = names
    k = check.shape(kn, k_pages, POOL_LAYOUT)
    v = check.shape(vn, v_pages, POOL_LAYOUT, tuple(k.shape))
    check.floating(kn, k)
    check.same_dtype(vn, v, kn, k)
    check.on_device(vn, v, k.device, kn)
    check.contiguous(kn, k)
    check.contiguous(vn, v)
    num_pages, page_size, heads, head_dim = k.shape
    return num_pages, page_size, heads, head_dim


def check_fusion_attention(
    q: torch.Tensor,
    q_indptr: torch.Tensor,
    q_pos: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    segments: SegmentTable,
    *,
    causal: bool,
    sm_scale: float | None,
    softcap: float,
    window_left: int,
    rope: RopeConfig | None,
) -> tuple[Requirement, float]:
    """Validate a call; returns what it needs from a device and the resolved sm_scale."""
    check.shape("q", q, ["num_q_tokens", "num_q_heads", "head_dim"])
    check.floating("q", q)
    num_q, hq, d = q.shape
    num_pages, page_size, hkv, _ = check_pool(k_pages, v_pages)
    check.same_dtype("k_pages", k_pages, "q", q)
    check.on_device("k_pages", k_pages, q.device, "q")
    if k_pages.shape[3] != d:
        check.shape("k_pages", k_pages, POOL_LAYOUT, [None, None, None, d])
    if hkv == 0 or hq % hkv:
        raise InvalidValueError("k_pages", f"num_kv_heads dividing num_q_heads ({hq})", f"num_kv_heads {hkv}")
    if not isinstance(segments, SegmentTable):
        raise InvalidValueError("segments", "a kvfuse.SegmentTable", type(segments).__name__)
    batch = segments.batch
    check.shape("q_indptr", q_indptr, ["batch + 1"], [batch + 1])
    check.dtype("q_indptr", q_indptr, torch.int32)
    check.on_device("q_indptr", q_indptr, q.device, "q")
    check.non_decreasing("q_indptr", q_indptr, 0, num_q)
    check.shape("q_pos", q_pos, ["num_q_tokens"], [num_q])
    check.dtype("q_pos", q_pos, torch.int32)
    check.on_device("q_pos", q_pos, q.device, "q")
    check.index_range("q_pos", q_pos, 0, 2**31 - 1)
    top = segments.validate(batch=batch, num_pages=num_pages, page_size=page_size, device=q.device)
    if not isinstance(causal, bool):
        raise InvalidValueError("causal", "a bool", type(causal).__name__)
    scale = d**-0.5 if sm_scale is None else check.number("sm_scale", sm_scale, lo=0.0)
    if scale <= 0 or scale == float("inf"):
        raise InvalidValueError("sm_scale", "a finite number > 0", scale)
    cap = check.number("softcap", softcap, lo=0.0, hi=float("inf"))
    if isinstance(window_left, bool) or not isinstance(window_left, int):
        raise InvalidValueError("window_left", "an int (-1: no window)", type(window_left).__name__)
    features = {"causal" if causal else "non_causal"}
    if hq != hkv:
        features.add("gqa")
    if window_left >= 0:
        features.add("window")
    if cap > 0:
        features.add("softcap")
    if rope is not None:
        if not isinstance(rope, RopeConfig):
            raise InvalidValueError("rope", "a kvfuse.RopeConfig or None", type(rope).__name__)
        rope.check("rope", d)
        check.index_range("q_pos", q_pos, 0, rope.max_position)
        if top >= rope.max_position:
            raise InvalidValueError("segments.seg_pos", f"key positions < rope.max_position ({rope.max_position})", top)
        features.add(f"rope_{rope.style}")
    req = Requirement(
        op="fusion_attention",
        dtype=dtype_name(q.dtype),
        head_dim=d,
        page_size=page_size,
        features=frozenset(features),
    )
    return req, scale


def fusion_attention_reference(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference, written for clarity (one request at a time).

    Returns out: [num_q_tokens, num_q_heads, head_dim], float64 and
    lse: [num_q_tokens, num_q_heads], float64.
    """
    num_q, hq, d = q.shape
    _, page_size, hkv, _ = k_pages.shape
    scale = d**-0.5 if sm_scale is None else sm_scale
    flat = segments.flatten(page_size)
    keys = k_pages.reshape(-1, hkv, d)[flat.slots].double()  # [num_kv_tokens, hkv, d]
    values = v_pages.reshape(-1, hkv, d)[flat.slots].double()
    queries = q.double()
    if rope is not None:
        cos, sin = rope.table(d, q.device)
        queries = rotate(queries, cos[q_pos.long()], sin[q_pos.long()], rope.style)
        keys = rotate(keys, cos[flat.k_pos], sin[flat.k_pos], rope.style)
    # q head h reads kv head h // group
    keys = keys.repeat_interleave(hq // hkv, dim=1)
    values = values.repeat_interleave(hq // hkv, dim=1)

    out = torch.zeros(num_q, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((num_q, hq), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(segments.batch):
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        k0, k1 = int(flat.kv_indptr[b]), int(flat.kv_indptr[b + 1])
        if q1 == q0 or k1 == k0:
            continue
        qp, kp = q_pos[q0:q1].long(), flat.k_pos[k0:k1]
        score = torch.einsum("qhd,khd->hqk", queries[q0:q1], keys[k0:k1]) * scale
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        visible = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device)
        if causal:
            visible &= kp[None, :] <= qp[:, None]
        if window_left >= 0:
            visible &= qp[:, None] - kp[None, :] <= window_left
        score = score.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(score, dim=-1)  # [hq, nq]; -inf where nothing is visible
        prob = torch.exp(score - row_lse[..., None]).nan_to_num(nan=0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", prob, values[k0:k1])
        lse[q0:q1] = row_lse.transpose(0, 1)
    return out, lse
