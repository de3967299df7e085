"""Triton kernels of the nvidia device (Triton-tutorial style).

Under ``TRITON_INTERPRET=1`` they run on CPU tensors; ``UPCAST`` then makes every tl.dot
operand fp32 (the interpreter's bf16 dot is wrong), while on a GPU fp16/bf16 operands go
to the tensor cores and fp32 ones use IEEE precision.
"""

from __future__ import annotations

import triton
import triton.language as tl
from kvfuse.devices.nvidia import configs


@triton.jit
def _rope_tile(
    x,
    x_partner,
    pos,
    offs_d,
    cos_ptr,
    sin_ptr,
    stride_cos,
    SIGN: tl.constexpr,
    ROPE: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    mask_rows,
):
    """Rotate a [rows, HEAD_DIM_PAD] fp32 tile at positions ``pos``; ``x_partner`` holds
    each dim's pair partner. SIGN=-1 rotates backwards (un-rotates)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    in_rot = offs_d < ROTARY_DIM
    if ROPE == 1:  # neox: pairs (i, i + HALF)
        idx = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
        first = offs_d < HALF
    else:  # gptj: pairs (2i, 2i + 1)
        idx = offs_d // 2
        first = (offs_d % 2) == 0
    row_mask = mask_rows[:, None] & in_rot[None, :]
    c = tl.load(cos_ptr + pos[:, None] * stride_cos + idx[None, :], mask=row_mask, other=1.0)
    s = tl.load(sin_ptr + pos[:, None] * stride_cos + idx[None, :], mask=row_mask, other=0.0) * SIGN
    sign = tl.where(first, -1.0, 1.0)
    return tl.where(in_rot[None, :], x * c + sign[None, :] * x_partner * s, x)


@triton.jit
def _partner(offs_d, ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr):
    HALF: tl.constexpr = ROTARY_DIM // 2
    if ROPE == 1:
        p = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    else:
        p = offs_d ^ 1
    return tl.where(offs_d < ROTARY_DIM, p, offs_d)


@triton.jit
def _fusion_attention_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    q_pos_ptr,
    q_indptr_ptr,
    tile_req_ptr,
    tile_start_ptr,
    kv_indptr_ptr,
    slots_ptr,
    k_pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_cos,
    sm_scale,
    softcap,
    window_left,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ROPE: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    # -- which request and which query rows this tile covers
    req = tl.load(tile_req_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    q_end = tl.load(q_indptr_ptr + req + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < q_end
    mask_d = offs_d < HEAD_DIM
    q_pos = tl.load(q_pos_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    q_ptrs = Q + offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if ROPE != 0:
        q_partner = tl.load(
            q_ptrs + _partner(offs_d, ROPE, ROTARY_DIM)[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
        ).to(tl.float32)
        q = _rope_tile(q, q_partner, q_pos, offs_d, cos_ptr, sin_ptr, stride_cos, 1.0, ROPE, ROTARY_DIM, mask_m)
    q_lo = q  # the 16-bit rounding of what q's 16-bit high part leaves out (used with RoPE)
    if not UPCAST:
        q_hi = q.to(Q.dtype.element_ty)
        q_lo = (q - q_hi.to(tl.float32)).to(Q.dtype.element_ty)
        q = q_hi
    # -- online softmax over the request's KV tokens, gathered through their slots
    kv_start = tl.load(kv_indptr_ptr + req)
    kv_end = tl.load(kv_indptr_ptr + req + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slot = tl.load(slots_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)  # int64: no index overflow
        k_pos = tl.load(k_pos_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = K + slot[:, None] * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptrs + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        if ROPE != 0:
            k_partner = tl.load(k_ptrs + _partner(offs_d, ROPE, ROTARY_DIM)[None, :], mask=kv_mask, other=0.0).to(
                tl.float32
            )
            k = _rope_tile(k, k_partner, k_pos, offs_d, cos_ptr, sin_ptr, stride_cos, 1.0, ROPE, ROTARY_DIM, mask_n)
        v = tl.load(V + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k))
        elif K.dtype.element_ty == tl.float32:
            s = tl.dot(q, tl.trans(k.to(K.dtype.element_ty)), input_precision="ieee")
        elif ROPE != 0:
            # rotated q and k are fp32: split each into a 16-bit high part and the 16-bit
            # rounding of the rest, and keep the three products that matter (the "3x"
            # trick): rounding rotated q/k to 16 bits alone misses the contract's lse bound
            k_hi = k.to(K.dtype.element_ty)
            k_lo = (k - k_hi.to(tl.float32)).to(K.dtype.element_ty)
            s = tl.dot(q, tl.trans(k_hi))
            s += tl.dot(q, tl.trans(k_lo))
            s += tl.dot(q_lo, tl.trans(k_hi))
        else:
            s = tl.dot(q, tl.trans(k.to(K.dtype.element_ty)))
        s = s * sm_scale
        if SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both tails
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        visible = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] <= window_left)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = tl.dot(p, v)
        elif V.dtype.element_ty == tl.float32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(V.dtype.element_ty), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # -- empty rows: out 0, lse -inf (never NaN)
    has_key = l_i > 0.0
    out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    o_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + offs_m.to(tl.int64) * stride_lt + head, lse, mask=mask_m)


@triton.jit
def _merge_states_kernel(
    Outs, Lses, Out, Lse, num_states, num_tokens, num_heads, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr
):
    """One (token, head) row: lse = logsumexp_i lse_i, out = sum_i exp(lse_i - lse) out_i."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    row = token * num_heads + head
    plane = num_tokens * num_heads  # rows per state
    # -- pass 1: the max lse
    top = tl.load(Lses + row)
    for i in range(1, num_states):
        top = tl.maximum(top, tl.load(Lses + i * plane + row))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    # -- pass 2: weights and the weighted sum
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for i in range(0, num_states):
        w = tl.exp(tl.load(Lses + i * plane + row) - top_safe)
        total += w
        acc += w * tl.load(Outs + (i * plane + row) * HEAD_DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    has = total > 0.0
    out = tl.where(has, acc / tl.where(has, total, 1.0), 0.0)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)
    lse = tl.where(has, top_safe + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    tl.store(Lse + row + tl.arange(0, 1), lse)


@triton.jit
def _rope_rerotate_kernel(
    K,
    Out,
    old_pos_ptr,
    new_pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_kt,
    stride_kh,
    stride_cos,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ROPE: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    num_tokens,
):
    """Un-rotate at old_pos and rotate at new_pos, in fp32, for BLOCK_T tokens of one head."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_t = offs_t < num_tokens
    mask = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = K + offs_t.to(tl.int64)[:, None] * stride_kt + head * stride_kh
    partner = _partner(offs_d, ROPE, ROTARY_DIM)
    x = tl.load(ptrs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(ptrs + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    old = tl.load(old_pos_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    new = tl.load(new_pos_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    # a pair rotates together: rotate x with its partner, and the partner with x
    y = _rope_tile(x, xp, old, offs_d, cos_ptr, sin_ptr, stride_cos, -1.0, ROPE, ROTARY_DIM, mask_t)
    yp = _rope_tile(xp, x, old, partner, cos_ptr, sin_ptr, stride_cos, -1.0, ROPE, ROTARY_DIM, mask_t)
    z = _rope_tile(y, yp, new, offs_d, cos_ptr, sin_ptr, stride_cos, 1.0, ROPE, ROTARY_DIM, mask_t)
    tl.store(
        Out + offs_t.to(tl.int64)[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
        z.to(Out.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _append_kv_kernel(K, V, KPages, VPages, slot_ptr, stride_kt, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Token t's row (num_kv_heads * head_dim elements) to slot slot_mapping[t], if >= 0."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + token + tl.zeros([BLOCK], dtype=tl.int64))  # broadcast: one mask per element
    mask = (offs < ROW) & (slot >= 0)
    dst = slot * ROW + offs  # int64
    tl.store(KPages + dst, tl.load(K + token * stride_kt + offs, mask=mask), mask=mask)
    tl.store(VPages + dst, tl.load(V + token * stride_kt + offs, mask=mask), mask=mask)


@triton.jit
def _move_pages_kernel(Src, Dst, src_ids_ptr, dst_ids_ptr, PAGE: tl.constexpr, BLOCK: tl.constexpr):
    """Page dst_ids[i] of Dst becomes page src_ids[i] of Src (PAGE elements each)."""
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PAGE
    src = tl.load(src_ids_ptr + i).to(tl.int64) * PAGE  # int64: pools of >= 32768 pages
    dst = tl.load(dst_ids_ptr + i).to(tl.int64) * PAGE
    tl.store(Dst + dst + offs, tl.load(Src + src + offs, mask=mask), mask=mask)


def attention_kernel():  # type: ignore[no-untyped-def]
    """The attention kernel, autotuned over ``configs.ATTENTION_AUTOTUNE`` on a GPU (unless
    ``configs.AUTOTUNE`` is off: then the caller passes ``configs.ATTENTION_FIXED``)."""
    if configs.INTERPRET or not configs.AUTOTUNE:
        return _fusion_attention_kernel
    return _autotuned


_autotuned = None
if not configs.INTERPRET:
    _autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
            for c in configs.ATTENTION_AUTOTUNE
        ],
        key=["HEAD_DIM_PAD", "BLOCK_M", "ROPE", "UPCAST"],
    )(_fusion_attention_kernel)
