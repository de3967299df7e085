"""AcmeDevice: the contract ops in plain torch, with a deliberately narrow declaration
(fp32/fp16, no softcap, blocking copies only, no rope_rerotate or blend_select)."""

from __future__ import annotations

from collections.abc import Sequence

import kvfuse
import torch

DTYPES = frozenset({"fp32", "fp16"})
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class AcmeDevice(kvfuse.Device):
    name = "acme"
    vendor = "Acme Semiconductor (example)"
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

    def _refuse(self, op: str, dtype: torch.dtype, feature: str | None = None) -> None:
        """Refuse what is not declared: the conformance suite probes for it."""
        if _NAMES.get(dtype) not in DTYPES:
            raise kvfuse.UnsupportedError(self.name, op, f"{op}.dtype={_NAMES.get(dtype, dtype)}")
        if feature:
            raise kvfuse.UnsupportedError(self.name, op, f"{op}.{feature}")

    def fusion_attention(
        self,
        q,
        q_indptr,
        q_pos,
        k_pages,
        v_pages,
        segments,
        *,  # type: ignore[no-untyped-def]
        causal,
        sm_scale,
        softcap,
        window_left,
        rope,
    ):
        self._refuse("fusion_attention", q.dtype, "softcap" if softcap > 0 else None)
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

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]):  # type: ignore[no-untyped-def]
        self._refuse("merge_states", states[0][0].dtype)
        lses = torch.stack([lse for _, lse in states])
        lse = torch.logsumexp(lses, 0)
        w = torch.exp(lses - lse).nan_to_num(0.0)
        out = sum(w[i][..., None] * o.float() for i, (o, _) in enumerate(states))
        return torch.as_tensor(out).to(states[0][0].dtype), lse

    def append_kv(self, k, v, k_pages, v_pages, slot_mapping):  # type: ignore[no-untyped-def]
        self._refuse("append_kv", k.dtype)
        keep = slot_mapping >= 0
        flat_k = k_pages.view(-1, *k_pages.shape[2:])
        flat_v = v_pages.view(-1, *v_pages.shape[2:])
        flat_k.index_copy_(0, slot_mapping[keep], k[keep])
        flat_v.index_copy_(0, slot_mapping[keep], v[keep])

    def gather_pages(self, k_pages, v_pages, page_ids):  # type: ignore[no-untyped-def]
        self._refuse("gather_pages", k_pages.dtype)
        ids = page_ids.long()
        return torch.index_select(k_pages, 0, ids), torch.index_select(v_pages, 0, ids)

    def scatter_pages(self, k_buf, v_buf, k_pages, v_pages, page_ids):  # type: ignore[no-untyped-def]
        self._refuse("scatter_pages", k_pages.dtype)
        k_pages.index_copy_(0, page_ids.long(), k_buf)
        v_pages.index_copy_(0, page_ids.long(), v_buf)

    def copy_pages(self, src_k, src_v, src_ids, dst_k, dst_v, dst_ids, *, non_blocking):  # type: ignore[no-untyped-def]
        self._refuse("copy_pages", src_k.dtype, "non_blocking" if non_blocking else None)
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
