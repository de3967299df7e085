"""Quickstart: reuse stored KV chunks at new positions and check against dense attention.

Two "documents" were prefilled earlier and their (un-rotated) KV sits in a paged pool.
A new request places them in a new order at new positions, followed by a live question,
and attends over all of it with one fusion_attention call. The result is compared with
torch SDPA over the same keys laid out densely (rotated at their positions).
"""

from __future__ import annotations

import kvfuse
import torch
import torch.nn.functional as F
from kvfuse.ops import _rope


def main() -> None:
    torch.manual_seed(0)
    page_size, hq, hkv, d = 16, 8, 2, 64
    rope = kvfuse.RopeConfig(max_position=4096)
    k_pages = torch.zeros(32, page_size, hkv, d)
    v_pages = torch.zeros(32, page_size, hkv, d)

    # Two stored documents (40 and 25 tokens), written into pages 3.. and 20..
    docs = {
        "doc_a": (torch.randn(40, hkv, d), torch.randn(40, hkv, d), [3, 4, 5]),
        "doc_b": (torch.randn(25, hkv, d), torch.randn(25, hkv, d), [20, 21]),
    }
    for k, v, pages in docs.values():
        slots = torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in pages])[: k.shape[0]]
        kvfuse.append_kv(k, v, k_pages, v_pages, slots)

    # New request: doc_b at position 0, doc_a at 25, live question (6 tokens) at 65.
    q_live_k, q_live_v = torch.randn(6, hkv, d), torch.randn(6, hkv, d)
    kvfuse.append_kv(q_live_k, q_live_v, k_pages, v_pages, torch.arange(30 * page_size, 30 * page_size + 6))
    segments = kvfuse.SegmentTable.from_lists([[([20, 21], 25, 0), ([3, 4, 5], 40, 25), ([30], 6, 65)]])
    q = torch.randn(6, hq, d)
    q_pos = torch.arange(65, 71, dtype=torch.int32)
    out, _lse = kvfuse.fusion_attention(
        q, torch.tensor([0, 6], dtype=torch.int32), q_pos, k_pages, v_pages, segments, rope=rope
    )

    # Dense baseline: concatenate keys in position order, rotate, run SDPA with a causal mask.
    keys = torch.cat([docs["doc_b"][0], docs["doc_a"][0], q_live_k])
    values = torch.cat([docs["doc_b"][1], docs["doc_a"][1], q_live_v])
    cos, sin = rope.table(d)
    pos = torch.arange(71)
    keys = _rope.rotate(keys, cos[pos], sin[pos], "neox")
    qr = _rope.rotate(q, cos[q_pos.long()], sin[q_pos.long()], "neox")
    mask = pos[None, :] <= q_pos[:, None].long()
    ref = F.scaled_dot_product_attention(
        qr.transpose(0, 1),
        keys.repeat_interleave(hq // hkv, 1).transpose(0, 1),
        values.repeat_interleave(hq // hkv, 1).transpose(0, 1),
        attn_mask=mask,
    ).transpose(0, 1)
    err = (out - ref).abs().max().item()
    print(f"fusion_attention over 2 stored chunks at new positions + live question: max |out - SDPA| = {err:.2e}")
    assert err < 1e-4, err


if __name__ == "__main__":
    main()
