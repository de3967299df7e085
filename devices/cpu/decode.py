"""The cpu device's decode path: few queries of one request over its keys, in torch.

For one query token an OpenVINO inference costs a fixed ~0.4 ms plus a staging gather;
for real models' decode (a handful of heads, head_dim 64-128, one token) that fixed cost
is most of the call. Here the request's keys and values are gathered with one
``index_select`` each, rotated in fp32 from the contract's table rows, and scored with
batched matmuls per kv head, all in fp32. ``device.py`` picks this path for at most
``DECODE_MAX_QUERIES`` queries over at most ``DECODE_MAX_ELEMENTS`` key elements
(keys × kv heads × head_dim), the crossover measured on this VM (bench ops, medians of 5,
fp32, ms torch / OpenVINO): SmolLM2 9/3/64 at 1k keys (196k elements) 0.55 / 1.14,
Qwen2.5 14/2/64 at 4k (524k) 0.82 / 1.15; Llama-3-8B 32/8/128 at 1k (1M) 3.90 / 1.83,
SmolLM2 at 4k (786k) 2.68 / 1.48.
"""

from __future__ import annotations

import math

import torch
from kvfuse.ops._rope import rotate

DECODE_MAX_ELEMENTS = 1 << 19  # keys × kv heads × head_dim: the measured crossover
DECODE_MAX_QUERIES = 4


def attend(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    slots: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    sm_scale: float,
    softcap: float,
    window_left: int,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    style: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's attention in fp32.

    q: [n_q, num_q_heads, head_dim]; q_pos: [n_q], int64
    k_rows, v_rows: [num_pages * page_size, num_kv_heads, head_dim] (the pools by slot)
    slots, k_pos: [n_k], int64
    Returns out: [n_q, num_q_heads, head_dim], fp32 and lse: [n_q, num_q_heads], fp32
    """
    n_q, hq, d = q.shape
    hkv = k_rows.shape[1]
    keys = k_rows.index_select(0, slots).float()
    values = v_rows.index_select(0, slots).float()
    queries = q.float()
    if cos is not None and sin is not None:
        queries = rotate(queries, cos[q_pos], sin[q_pos], style)
        keys = rotate(keys, cos[k_pos], sin[k_pos], style)
    g = hq // hkv
    qg = (queries * sm_scale).view(n_q, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n_q * g, d)
    scores = torch.bmm(qg, keys.permute(1, 2, 0))  # [hkv, n_q * g, n_k]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(hkv, n_q, g, -1)
    visible = torch.ones(n_q, k_pos.shape[0], dtype=torch.bool)
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    if window_left >= 0:
        visible &= q_pos[:, None] - k_pos[None, :] <= window_left
    scores = scores.masked_fill(~visible[None, :, None, :], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [hkv, n_q, g]; -inf where nothing is visible
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.bmm(probs.reshape(hkv, n_q * g, -1), values.permute(1, 0, 2))  # [hkv, n_q * g, d]
    out = out.view(hkv, n_q, g, d).permute(1, 0, 2, 3).reshape(n_q, hq, d)
    return out, lse.permute(1, 0, 2).reshape(n_q, hq)
