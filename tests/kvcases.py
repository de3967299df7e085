"""Test helpers: random paged KV problems, and an independent dense float64 attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import kvfuse
import torch


@dataclass
class Problem:
    q: torch.Tensor
    q_indptr: torch.Tensor
    q_pos: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    segments: kvfuse.SegmentTable
    spec: list[list[tuple[int, int]]]  # per request: (length, pos) of each segment
    pages: list[list[list[int]]]  # per request, per segment: its page ids

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.q, self.q_indptr, self.q_pos, self.k_pages, self.v_pages)


def make_problem(
    spec: list[list[tuple[int, int]]],
    q_pos: list[list[int]],
    *,
    hq: int = 4,
    hkv: int = 2,
    d: int = 64,
    page_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_pages: int = 3,
) -> Problem:
    """Segments ``(length, pos)`` per request on shuffled pages of a fresh pool."""
    g = torch.Generator().manual_seed(seed)
    need = sum(math.ceil(n / page_size) for req in spec for n, _ in req)
    num_pages = need + spare_pages
    order = torch.randperm(num_pages, generator=g).tolist()
    pages: list[list[list[int]]] = []
    rows = []
    for req in spec:
        req_pages = []
        for n, pos in req:
            ids = [order.pop() for _ in range(math.ceil(n / page_size))]
            req_pages.append(ids)
            rows.append((ids, n, pos))
        pages.append(req_pages)
    it = iter(rows)
    segments = kvfuse.SegmentTable.from_lists([[next(it) for _ in req] for req in spec])
    k_pages = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    v_pages = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    flat_pos = [p for req in q_pos for p in req]
    q = torch.randn(len(flat_pos), hq, d, generator=g).to(dtype)
    indptr = [0]
    for req in q_pos:
        indptr.append(indptr[-1] + len(req))
    return Problem(
        q,
        torch.tensor(indptr, dtype=torch.int32),
        torch.tensor(flat_pos, dtype=torch.int32),
        k_pages,
        v_pages,
        segments,
        spec,
        pages,
    )


def _rope_complex(x: torch.Tensor, pos: int, rope: kvfuse.RopeConfig) -> torch.Tensor:
    """Rotate one token ``x: [heads, head_dim]`` float64 as complex pairs, from the fp32 table."""
    d = x.shape[-1]
    r = rope.dims(d)
    cos, sin = rope.table(d)
    turn = torch.complex(cos[pos].double(), sin[pos].double())  # e^{i angle}
    out = x.clone()
    if rope.style == "neox":
        z = torch.complex(x[:, : r // 2], x[:, r // 2 : r]) * turn
        out[:, : r // 2], out[:, r // 2 : r] = z.real, z.imag
    else:
        z = torch.complex(x[:, 0:r:2], x[:, 1:r:2]) * turn
        out[:, 0:r:2], out[:, 1:r:2] = z.real, z.imag
    return out


def dense_attention(
    p: Problem,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    softcap: float = 0.0,
    window_left: int = -1,
    rope: kvfuse.RopeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, query by query, in float64: the definition, nothing shared with kvfuse
    but the RoPE table. Returns out [num_q_tokens, num_q_heads, head_dim] and lse
    [num_q_tokens, num_q_heads], float64."""
    num_q, hq, d = p.q.shape
    page_size, hkv = p.k_pages.shape[1], p.k_pages.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    out = torch.zeros(num_q, hq, d, dtype=torch.float64)
    lse = torch.full((num_q, hq), -math.inf, dtype=torch.float64)
    for b, req in enumerate(p.spec):
        keys, values, kpos = [], [], []
        for (n, pos), ids in zip(req, p.pages[b]):
            for t in range(n):
                page, row = ids[t // page_size], t % page_size
                k = p.k_pages[page, row].double()
                keys.append(_rope_complex(k, pos + t, rope) if rope else k)
                values.append(p.v_pages[page, row].double())
                kpos.append(pos + t)
        for i in range(int(p.q_indptr[b]), int(p.q_indptr[b + 1])):
            qp = int(p.q_pos[i])
            qi = p.q[i].double()
            if rope:
                qi = _rope_complex(qi, qp, rope)
            vis = [
                j
                for j, kp in enumerate(kpos)
                if (not causal or kp <= qp) and (window_left < 0 or qp - kp <= window_left)
            ]
            if not vis:
                continue
            for h in range(hq):
                kh = h // (hq // hkv)
                s = torch.stack([scale * (qi[h] * keys[j][kh]).sum() for j in vis])
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                m = s.max()
                w = torch.exp(s - m)
                lse[i, h] = m + torch.log(w.sum())
                out[i, h] = (w[:, None] * torch.stack([values[j][kh] for j in vis])).sum(0) / w.sum()
    return out, lse


TOL = {
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
    torch.float16: ((1e-2, 1e-3), (1e-3, 1e-3)),
    torch.bfloat16: ((1.5e-2, 1e-2), (1e-3, 1e-2)),
}
"""CONTRACTS.md tolerances: dtype → ((out atol, rtol), (lse atol, rtol))."""


def assert_close_lse(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """-inf must match exactly; finite values within tolerance."""
    a, e = actual.double(), expected.double()
    assert torch.equal(torch.isneginf(a), torch.isneginf(e)), "-inf pattern differs"
    fin = torch.isfinite(e)
    torch.testing.assert_close(a[fin], e[fin], atol=atol, rtol=rtol)
