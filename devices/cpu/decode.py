"""The cpu device's torch paths: decode (few queries of one request over its keys) and
plain causal prefill (a request whose queries are its keys), both on torch's cpu
flash-attention kernel, which returns the lse.

Plain causal prefill: the request's queries sit at its keys' positions, so the mask is the
square causal one the kernel applies itself (``is_causal``); kv heads are the batch and
each one's q heads attend over its keys expanded without a copy. On SmolLM2's geometry
with RoPE (this VM, ms kernel / OpenVINO graph): 1k tokens 11.1 / 19.7, 4k 125 / 168.

For one query token an OpenVINO inference costs a fixed ~0.4 ms plus a staging gather;
for real models' decode (a handful of heads, head_dim 64-128, one token) that fixed cost
is most of the call. Here the request's keys and values are gathered with one
``index_select`` each, rotated in fp32 from the contract's table rows, and scored per kv
head, all in fp32. ``device.py`` picks this path for at most ``DECODE_MAX_QUERIES`` queries over at most
``DECODE_MAX_ELEMENTS`` key elements (keys × kv heads × head_dim). With the fused kernel,
per-thread staging buffers and per-plan derivation it beat the OpenVINO graph at every
real-model decode shape measured on this VM (bench ops, planned runs, fp32, ms torch /
OpenVINO): SmolLM2 9/3/64 at 4k 0.58 / 0.80, Qwen2.5 14/2/64 at 4k 0.29 / 0.63,
Llama-3-8B 32/8/128 at 1k 0.61 / 1.21 and at 4k 3.90 / 5.20; the bound caps the staging
memory (64 MiB per fp32 buffer), not speed.

What does not change between layers (table rows of every position, the visibility mask)
is derived once per plan by :func:`prepare` (``SegmentTable.memo``); :func:`attend` runs
per layer. Where every query sees every key (a decode step), scores, softmax and the
weighted sum are one fused kernel (torch's cpu flash attention, which returns the lse);
otherwise batched matmuls with the mask.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
from kvfuse.ops._rope import rotate

DECODE_MAX_ELEMENTS = 1 << 24  # keys × kv heads × head_dim: bounds the staging buffers
DECODE_MAX_QUERIES = 4
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_local = threading.local()


@dataclass(frozen=True)
class Request:
    """One request's decode, as its plan fixes it (the same for every layer).

    slots: [n_k], int64
    rope: cos, sin rows at the queries' then the keys' positions, [n_q or n_k, rotary_dim // 2], fp32, or None
    hidden: [n_q, n_k], bool — True where a query must not see a key; None when all see all
    """

    q0: int
    q1: int
    slots: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    hidden: torch.Tensor | None
    square: bool = False  # a plain causal prefill: the queries are the keys, position for position
    carried: dict[object, Any] | None = None  # the plan chain's state (SegmentTable.carried)
    index: int = 0  # the request's place in its batch
    gen: int = 0  # this plan's number in the chain
    reuse: int = 0  # leading keys identical (slots, positions) to the previous plan's


@dataclass
class _Held:
    """One layer's keys (rotated) and values of one request, kept along a plan chain.

    keys, values: [num_kv_heads, capacity, head_dim]; the first ``n`` are the keys of the
    plan numbered ``gen``
    """

    k_rows: torch.Tensor  # the pools they were gathered from (kept alive: their addresses stay theirs)
    v_rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    n: int
    gen: int
    gathered: int = 0  # keys gathered (and rotated) into these buffers, in all


def prepare(
    q0: int,
    q_pos: torch.Tensor,
    slots: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    window_left: int,
    table: tuple[torch.Tensor, torch.Tensor] | None,
    carried: dict[object, Any] | None = None,
    index: int = 0,
) -> Request:
    """What :func:`attend` needs besides the layer's q and pools; with ``carried`` (a plan
    chain's state), how many leading keys the previous plan of the chain had the same.

    q_pos: [n_q], int64; slots, k_pos: [n_k], int64
    table: the RoPE cos/sin table, [max_position, rotary_dim // 2], fp32, or None
    """
    gen = reuse = 0
    if carried is not None:
        gen = carried["gen"]
        prev = carried.get(("request", index))
        if prev is not None and prev[2] == gen - 1:
            n = int(prev[0].shape[0])
            if n <= slots.shape[0] and torch.equal(slots[:n], prev[0]) and torch.equal(k_pos[:n], prev[1]):
                reuse = n
        carried[("request", index)] = (slots, k_pos, gen)
    visible = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool)
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    if window_left >= 0:
        visible &= q_pos[:, None] - k_pos[None, :] <= window_left
    rows = None
    if table is not None:
        cos, sin = table
        rows = (cos[q_pos], sin[q_pos], cos[k_pos], sin[k_pos])
    hidden = None if bool(visible.all()) else ~visible
    return Request(q0, q0 + int(q_pos.shape[0]), slots, rows, hidden, False, carried, index, gen, reuse)


def prefill(
    q0: int, pos: torch.Tensor, slots: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor] | None
) -> Request:
    """A plain causal prefill: the request's queries are its keys, at the same positions.

    pos, slots: [n], int64
    table: the RoPE cos/sin table, [max_position, rotary_dim // 2], fp32, or None
    """
    rows = None
    if table is not None:
        cos, sin = table[0][pos], table[1][pos]
        rows = (cos, sin, cos, sin)
    return Request(q0, q0 + int(pos.shape[0]), slots, rows, None, True)


def _staging(which: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reused per-thread buffer of ``shape`` (a fresh one would page-fault in on every
    call: on this VM that tripled the cost of a 4k-key gather)."""
    held = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = held.get((which, dtype))
    if buf is None or buf.numel() < numel:
        buf = held[(which, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _gather(which: int, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``rows[slots]`` head-major, [num_kv_heads, n_k, head_dim], in rows' dtype: a
    transposed view of one index_select for a few keys, else a staging buffer filled
    head by head (contiguous for the kernel)."""
    if slots.shape[0] <= 256:
        return rows.index_select(0, slots).transpose(0, 1)
    out = _staging(which, (rows.shape[1], slots.shape[0], rows.shape[2]), rows.dtype)
    for h in range(rows.shape[1]):
        torch.index_select(rows[:, h], 0, slots, out=out[h])
    return out


def _rotate_keys(
    keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, out: torch.Tensor
) -> torch.Tensor:
    """Head-major keys rotated in fp32 into ``out``, one exactly rounded op at a time (a
    key rotates to the same bits whether it is rotated alone or among others).

    keys: [num_kv_heads, n, head_dim]; cos, sin: [n, rotary_dim // 2], fp32
    out: [num_kv_heads, n, head_dim], fp32
    """
    half = cos.shape[-1]
    a, b = (
        (slice(0, half), slice(half, 2 * half)) if style == "neox" else (slice(0, 2 * half, 2), slice(1, 2 * half, 2))
    )
    x1, x2 = keys[..., a].float(), keys[..., b].float()
    tmp = _staging(4, (keys.shape[0], keys.shape[1], half), torch.float32)
    torch.mul(x1, cos, out=out[..., a]).sub_(torch.mul(x2, sin, out=tmp))
    torch.mul(x2, cos, out=out[..., b]).add_(torch.mul(x1, sin, out=tmp))
    if 2 * half < keys.shape[-1]:
        out[..., 2 * half :] = keys[..., 2 * half :]
    return out


def _keys_values(
    k_rows: torch.Tensor, v_rows: torch.Tensor, req: Request, style: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's keys (rotated in fp32 with RoPE) and values, head-major
    [num_kv_heads, n_k, head_dim]: in staging buffers, or, along a plan chain, in the
    layer's kept buffers, where only the keys the previous plan did not have are gathered
    and rotated."""
    hkv, d = k_rows.shape[1:]
    n_k = int(req.slots.shape[0])
    dtype = torch.float32 if req.rope is not None else k_rows.dtype
    if req.carried is None or not req.carried.get("chained"):  # no later step will extend this plan (yet)
        keys, values = _gather(0, k_rows, req.slots), _gather(1, v_rows, req.slots)
        if req.rope is not None:
            keys = _rotate_keys(keys, req.rope[2], req.rope[3], style, _staging(2, (hkv, n_k, d), torch.float32))
        if values.dtype != dtype:  # bf16 values beside rotated fp32 keys
            values = _staging(3, (hkv, n_k, d), dtype).copy_(values)
        return keys, values
    slot = (req.index, k_rows.data_ptr(), v_rows.data_ptr(), threading.get_ident())
    held = req.carried.get(slot)
    start = 0
    if held is not None and held.gen == req.gen - 1 and held.n == req.reuse and held.keys.dtype == dtype:
        start = req.reuse
    if held is None or held.keys.dtype != dtype or held.keys.shape[1] < n_k:
        capacity = max(n_k + 256, 2 * start)  # room for a decode's next keys, then doubling
        grown = _Held(
            k_rows,
            v_rows,
            torch.empty(hkv, capacity, d, dtype=dtype),
            torch.empty(hkv, capacity, d, dtype=dtype),
            0,
            0,
            held.gathered if held is not None else 0,
        )
        if start:
            grown.keys[:, :start], grown.values[:, :start] = held.keys[:, :start], held.values[:, :start]  # type: ignore[union-attr]
        held = req.carried[slot] = grown
    new = req.slots[start:]
    fresh_k, fresh_v = _gather(0, k_rows, new), _gather(1, v_rows, new)
    if req.rope is not None:
        _rotate_keys(fresh_k, req.rope[2][start:], req.rope[3][start:], style, held.keys[:, start:n_k])
    else:
        held.keys[:, start:n_k] = fresh_k
    held.values[:, start:n_k] = fresh_v
    held.n, held.gen, held.gathered = n_k, req.gen, held.gathered + n_k - start
    return held.keys[:, :n_k], held.values[:, :n_k]


def attend(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    req: Request,
    *,
    sm_scale: float,
    softcap: float,
    style: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's attention in fp32.

    q: [n_q, num_q_heads, head_dim]
    k_rows, v_rows: [num_pages * page_size, num_kv_heads, head_dim] (the pools by slot)
    Returns out: [n_q, num_q_heads, head_dim], fp32 and lse: [n_q, num_q_heads], fp32
    """
    n_q, hq, d = q.shape
    hkv = k_rows.shape[1]
    keys, values = _keys_values(k_rows, v_rows, req, style)  # [hkv, n_k, d]; rotated in fp32 with RoPE
    queries = q if req.rope is None else rotate(q.float(), req.rope[0], req.rope[1], style)
    if keys.dtype != torch.float32 or softcap > 0 or req.hidden is not None:
        keys, values, queries = keys.float(), values.float(), queries.float()
    g = hq // hkv
    if req.square:  # kv heads as the batch, their q heads as heads over the keys expanded (no copy)
        qh = queries.reshape(n_q, hkv, g, d).permute(1, 2, 0, 3)  # [hkv, g, n, d]
        kx, vx = keys[:, None].expand(hkv, g, n_q, d), values[:, None].expand(hkv, g, n_q, d)
        o, lse = _flash(qh, kx, vx, is_causal=True, scale=sm_scale)  # [hkv, g, n, d], [hkv, g, n]
        return o.permute(2, 0, 1, 3).reshape(n_q, hq, d).float(), lse.permute(2, 0, 1).reshape(n_q, hq)
    qg = queries.reshape(n_q, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n_q * g, d)
    if req.hidden is None and softcap <= 0:
        # kv heads as the batch, one head each: [hkv, 1, n_q * g, d] over [hkv, 1, n_k, d];
        # 16-bit inputs without RoPE go in as they are (the kernel accumulates in fp32)
        o, lse = _flash(qg[:, None], keys[:, None], values[:, None], scale=sm_scale)
        o, lse = o[:, 0].float(), lse[:, 0].view(hkv, n_q, g)
    else:
        scores = torch.bmm(qg * sm_scale, keys.transpose(1, 2))  # [hkv, n_q * g, n_k]
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.view(hkv, n_q, g, -1)
        if req.hidden is not None:
            scores = scores.masked_fill(req.hidden[None, :, None, :], -math.inf)
        lse = torch.logsumexp(scores, dim=-1)  # [hkv, n_q, g]; -inf where nothing is visible
        probs = torch.exp(scores - lse[..., None])
        if req.hidden is not None:
            probs = probs.nan_to_num(0.0)
        o = torch.bmm(probs.reshape(hkv, n_q * g, -1), values)  # [hkv, n_q * g, d]
    out = o.view(hkv, n_q, g, d).permute(1, 0, 2, 3).reshape(n_q, hq, d)
    return out, lse.permute(1, 0, 2).reshape(n_q, hq)
