"""Seeded inputs for a case, and the op call they make. Nothing here is a reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import kvfuse
import torch

DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class AttentionInputs:
    q: torch.Tensor
    q_indptr: torch.Tensor
    q_pos: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    requests: list[list[tuple[list[int], int, int]]]  # per request: (pages, length, pos)
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def table(self, order: str = "as-is", keep: set[int] | None = None) -> kvfuse.SegmentTable:
        """The segment table, optionally reversed or restricted to segment indices ``keep``."""
        reqs = []
        for req in self.requests:
            segs = [s for i, s in enumerate(req) if keep is None or i in keep]
            reqs.append(segs[::-1] if order == "reversed" else segs)
        return kvfuse.SegmentTable.from_lists(reqs, device=self.device)

    def args(self, segments: kvfuse.SegmentTable | None = None) -> tuple[Any, ...]:
        return (self.q, self.q_indptr, self.q_pos, self.k_pages, self.v_pages, segments or self.table())

    def to(self, device: torch.device) -> AttentionInputs:
        """The same inputs on ``device`` (the segment table is built there by ``table``)."""
        q, qi, qp, kp, vp = place((self.q, self.q_indptr, self.q_pos, self.k_pages, self.v_pages), device)
        moved = AttentionInputs(q, qi, qp, kp, vp, self.requests, self.kwargs)
        moved.device = device
        return moved


def attention_inputs(p: dict[str, Any], seed: int) -> AttentionInputs:
    """Stored segments plus a live segment per request on shuffled pages; queries are the
    live tokens (or the positions in ``p["q"]``)."""
    g = torch.Generator().manual_seed(seed)
    dtype, page, hkv, d = DTYPE[p["dtype"]], p["page_size"], p["num_kv_heads"], p["head_dim"]
    hq = hkv * p["group"]
    segs_per_req = []
    for req in p["layout"]["requests"]:
        segs = [tuple(s) for s in req["stored"]]
        if req["live"][0] > 0:
            segs.append(tuple(req["live"]))
        segs_per_req.append(segs)
    need = sum(math.ceil(n / page) for segs in segs_per_req for n, _ in segs)
    num_pages = max(p.get("pool_pages", 0), need + 3)
    # take pages from the top of the pool, shuffled, so large ids are exercised
    free = (num_pages - 1 - torch.randperm(need + 3, generator=g)).tolist()
    requests = []
    for segs in segs_per_req:
        requests.append([([free.pop() for _ in range(math.ceil(n / page))], n, pos) for n, pos in segs])
    k_pages = torch.randn(num_pages, page, hkv, d, generator=g).to(dtype)
    v_pages = torch.randn(num_pages, page, hkv, d, generator=g).to(dtype)
    q_pos_lists = p.get("q") or [
        list(range(r["live"][1], r["live"][1] + r["live"][0])) for r in p["layout"]["requests"]
    ]
    flat = [x for r in q_pos_lists for x in r]
    indptr = [0]
    for r in q_pos_lists:
        indptr.append(indptr[-1] + len(r))
    q = torch.randn(len(flat), hq, d, generator=g).to(dtype)
    kwargs: dict[str, Any] = {k: p[k] for k in ("causal", "window_left", "softcap", "sm_scale") if k in p}
    if p.get("rope"):
        kwargs["rope"] = kvfuse.RopeConfig(**p["rope"])
    i32 = torch.int32
    return AttentionInputs(
        q, torch.tensor(indptr, dtype=i32), torch.tensor(flat, dtype=i32), k_pages, v_pages, requests, kwargs
    )


def resolve_device(device: str, torch_device: str | torch.device | None = None) -> torch.device:
    """The torch device a kvfuse device's conformance inputs live on: ``torch_device`` if
    given (it must be of the device's type), else the device's ``torch_device_type`` with
    torch's current index for it."""
    kind = kvfuse.registry().get(device, require_available=False).torch_device_type
    if torch_device is not None:
        tdev = torch.device(torch_device)
        if tdev.type != kind:
            raise kvfuse.DeviceMismatchError("torch_device", f"a {kind!r} torch device for {device!r}", str(tdev))
        return tdev
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def place(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` (tensors, segment tables, and lists, tuples and dicts of them) with every
    tensor copied to ``device``, keeping strides. A tensor that occurs twice is copied once,
    so calls that pass one pool twice still do after the move."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj if obj.device == device else _copy_strided(obj, device)
        return memo[id(obj)]
    if isinstance(obj, kvfuse.SegmentTable):
        fields = ("seg_indptr", "page_indptr", "page_indices", "seg_len", "seg_pos")
        return kvfuse.SegmentTable(**{f: place(getattr(obj, f), device, memo) for f in fields})
    if isinstance(obj, (list, tuple)):
        return type(obj)(place(x, device, memo) for x in obj)
    if isinstance(obj, dict):
        return {k: place(v, device, memo) for k, v in obj.items()}
    return obj


def _copy_strided(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with the same sizes and strides (views stay views of a
    buffer of the same layout, so non-contiguous inputs stay non-contiguous)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def pool(p: dict[str, Any], g: torch.Generator, num_pages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = num_pages or p["num_pages"]
    kv = torch.randn(2, n, p["page_size"], p["num_kv_heads"], p["head_dim"], generator=g).to(DTYPE[p["dtype"]])
    return kv[0], kv[1]


def page_ids(num_pages: int, n: int, g: torch.Generator, *, unique: bool) -> torch.Tensor:
    """``n`` page ids biased to the top of the pool (index-overflow bait); repeats unless unique."""
    top = min(num_pages, max(2 * n, 8))
    ids = num_pages - 1 - torch.randperm(top, generator=g)[:n]
    if not unique and n > 2:
        ids[-1] = ids[0]  # a repeated id
    return ids.to(torch.int32)
