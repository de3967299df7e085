"""AcmeDevice: the contract ops in plain torch, with a deliberately narrow declaration
(fp32/fp16, no softcap, blocking copies only, no rope_rerotate or blend_select).

kvfuse never calls an op with what ``capabilities()`` does not declare (it raises
``UnsupportedError`` itself), so the methods below need no refusal code."""

from __future__ import annotations

from collections.abc import Sequence

import kvfuse
import torch

DTYPES = frozenset({"fp32", "fp16"})


class AcmeDevice(kvfuse.Device):
    name = "acme"
    vendor = "Acme Semiconductor (example)"
    api_version = "1.0"
    torch_device_type = "cpu"
    priority = 1

    def probe(self) -> kvfuse.Availability:
        return kvfuse.Availability(available=True, reason="plain torch on the host", mode="example")

    def capabilities(self) -> kvfuse.Capabilities:
        attn = {"gqa", "causal", "non_causal", "window", "rope_neox", "rope_gptj"}  # no softcap
        ops = {
            "fusion_attention": kvfuse.OpCapability(dtypes=DTYPES, features=frozenset(attn)),
            "merge_states": kvfuse.OpCapability(dtypes=DTYPES),
        }
        for op in ("append_kv", "gather_pages", "scatter_pages", "copy_pages"):
            ops[op] = kvfuse.OpCapability(dtypes=DTYPES)
        return kvfuse.Capabilities(ops=ops, reach=frozenset({"cpu"}))

    def fusion_attention(
        self,
        q: torch.Tensor,
        q_indptr: torch.Tensor,
        q_pos: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        segments: kvfuse.SegmentTable,
        *,
        causal: bool,
        sm_scale: float,
        softcap: float,
        window_left: int,
        rope: kvfuse.RopeConfig | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_q, hq, d = q.shape
        _, page_size, hkv, _ = k_pages.shape
        flat = segments.flatten(page_size)
        keys = k_pages.reshape(-1, hkv, d)[flat.slots].float()
        values = v_pages.reshape(-1, hkv, d)[flat.slots].float()
        queries = q.float()
        if rope is not None:
            cos, sin = rope.table(d, q.device)
            queries = _rotate(queries, cos[q_pos.long()], sin[q_pos.long()], rope.style)
            keys = _rotate(keys, cos[flat.k_pos], sin[flat.k_pos], rope.style)
        out = torch.zeros(num_q, hq, d, dtype=torch.float32)
        lse = torch.full((num_q, hq), float("-inf"))
        for b in range(segments.batch):
            q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
            k0, k1 = int(flat.kv_indptr[b]), int(flat.kv_indptr[b + 1])
            if q1 == q0 or k1 == k0:
                continue
            k = keys[k0:k1].repeat_interleave(hq // hkv, 1).transpose(0, 1)  # [hq, nk, d]
            v = values[k0:k1].repeat_interleave(hq // hkv, 1).transpose(0, 1)
            s = queries[q0:q1].transpose(0, 1) @ k.transpose(1, 2) * sm_scale  # [hq, nq, nk]
            qp, kp = q_pos[q0:q1].long()[:, None], flat.k_pos[k0:k1][None, :]
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
            if causal:
                mask &= kp <= qp
            if window_left >= 0:
                mask &= qp - kp <= window_left
            s = s.masked_fill(~mask, float("-inf"))
            row = torch.logsumexp(s, -1)  # [hq, nq]
            p = torch.exp(s - row[..., None]).nan_to_num(0.0)
            out[q0:q1] = (p @ v).transpose(0, 1)
            lse[q0:q1] = row.transpose(0, 1)
        return out.to(q.dtype), lse

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        lses = torch.stack([lse for _, lse in states])
        lse = torch.logsumexp(lses, 0)
        w = torch.exp(lses - lse).nan_to_num(0.0)
        out = sum(w[i][..., None] * o.float() for i, (o, _) in enumerate(states))
        return torch.as_tensor(out).to(states[0][0].dtype), lse

    def append_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        keep = slot_mapping >= 0
        flat_k = k_pages.view(-1, *k_pages.shape[2:])
        flat_v = v_pages.view(-1, *v_pages.shape[2:])
        flat_k.index_copy_(0, slot_mapping[keep], k[keep])
        flat_v.index_copy_(0, slot_mapping[keep], v[keep])

    def gather_pages(
        self, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = page_ids.long()
        return torch.index_select(k_pages, 0, ids), torch.index_select(v_pages, 0, ids)

    def scatter_pages(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
    ) -> None:
        k_pages.index_copy_(0, page_ids.long(), k_buf)
        v_pages.index_copy_(0, page_ids.long(), v_buf)

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
    ) -> kvfuse.TransferHandle:
        dst_k.index_copy_(0, dst_ids.long(), torch.index_select(src_k, 0, src_ids.long()))
        dst_v.index_copy_(0, dst_ids.long(), torch.index_select(src_v, 0, src_ids.long()))
        return kvfuse.TransferHandle(dst_ids.tolist())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """RoPE with rows of kvfuse's fp32 table. x: [n, heads, head_dim], fp32."""
    half = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.clone()
    if style == "neox":
        a, b = x[..., :half], x[..., half : 2 * half]
        out[..., :half], out[..., half : 2 * half] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = a * c - b * s, b * c + a * s
    return out
