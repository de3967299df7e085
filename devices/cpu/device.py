"""CpuDevice: Intel/x86 through OpenVINO's CPU plugin.

fusion_attention runs as a compiled OpenVINO model (``attention.py``), except decode and
plain causal prefill, which run on torch's cpu flash-attention kernel where it was
measured faster (``decode.py``); each plan routes its requests once. The ops OpenVINO
does not fit (moves, merge, rope_rerotate, blend_select) are vectorised torch on host
memory, but for page moves between contiguous host pools and buffers: one pass in C
(``rows.c``, ``moves.py``) on torch's own OpenMP team, where that extension was built.
fp32 calls compile with ``INFERENCE_PRECISION_HINT=f32`` (the CPU plugin would otherwise
run them in bf16 on AVX-512 BF16 parts). Scores are f32 for every dtype; bf16
probabilities and values feed the second MatMul as bf16 with fp32 accumulation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from kvfuse import (
    Availability,
    Capabilities,
    Device,
    DeviceError,
    RopeConfig,
    SegmentTable,
    TransferHandle,
)
from kvfuse.devices.cpu import decode, moves
from kvfuse.devices.cpu.attention import OV_TYPES, ModelCache, Signature
from kvfuse.ops import _blend, _rope
from kvfuse.ops._segments import FlatSegments

_copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-cpu-copy")
SCORE_BYTES = 256 << 20  # largest fp32 score tensor one inference may materialise
STAGING_BYTES = 512 << 20  # largest K (or V) gather kept in a reused buffer
MIN_BLOCK, MAX_BLOCKS = 64, 8  # causal query blocks: smallest, and most per request


def _ov_input(t: torch.Tensor) -> object:
    """A zero-copy OpenVINO view of a contiguous host tensor (bf16 via its raw bits)."""
    import openvino as ov

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return ov.Tensor(t.view(torch.int16).numpy(), list(t.shape), ov.Type.bf16)
    return ov.Tensor(t.numpy(), shared_memory=True)


@dataclass(frozen=True)
class _Route:
    """Per plan: which requests take torch's kernel (decode or plain causal prefill, with
    what they derive once), and which (q0, q1, k0, k1) query and key ranges go to OpenVINO.

    q_pos: [num_q_tokens], int64
    """

    flat: FlatSegments
    q_pos: torch.Tensor
    causal: bool
    decode: list[decode.Request]
    rest: list[tuple[int, int, int, int]]


def _route(
    q_indptr: torch.Tensor,
    q_pos: torch.Tensor,
    segments: SegmentTable,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    causal: bool,
    window_left: int,
    softcap: float,
    rope: RopeConfig | None,
) -> _Route:
    """Route each request of a call: the decode path for at most DECODE_MAX_QUERIES queries
    over at most DECODE_MAX_ELEMENTS key elements; a plain causal prefill (the queries are
    the keys, position for position, no window or softcap) to torch's causal kernel;
    OpenVINO otherwise; empty ones nowhere.

    q_indptr: [batch + 1], int32; q_pos: [num_q_tokens], int32
    """
    flat = segments.flatten(page_size)
    qi, ki = q_indptr.tolist(), flat.kv_indptr.tolist()
    q_pos64 = q_pos.to(torch.int64)
    table = rope.table(head_dim) if rope is not None else None
    carried = segments.carried()  # a plan chain's state: decode keeps each layer's keys across steps
    if carried is not None:
        carried["gen"] = carried.get("gen", 0) + 1
    route = _Route(flat, q_pos64, causal, [], [])
    for b in range(len(qi) - 1):
        q0, q1, k0, k1 = qi[b], qi[b + 1], ki[b], ki[b + 1]
        if q0 == q1 or k0 == k1:
            continue
        slots, k_pos = flat.slots[k0:k1], flat.k_pos[k0:k1]
        few = q1 - q0 <= decode.DECODE_MAX_QUERIES
        if few and (k1 - k0) * num_kv_heads * head_dim <= decode.DECODE_MAX_ELEMENTS:
            route.decode.append(
                decode.prepare(
                    q0,
                    q_pos64[q0:q1],
                    slots,
                    k_pos,
                    causal=causal,
                    window_left=window_left,
                    table=table,
                    carried=carried,
                    index=b,
                )
            )
        elif (
            not few
            and causal
            and window_left < 0
            and softcap == 0
            and q1 - q0 == k1 - k0
            and (k1 - k0) * num_kv_heads * head_dim <= decode.DECODE_MAX_ELEMENTS
            and torch.equal(q_pos64[q0:q1], k_pos)
        ):
            route.decode.append(decode.prefill(q0, k_pos, slots, table))
        else:
            route.rest.append((q0, q1, k0, k1))
    return route


class CpuDevice(Device):
    name = "cpu"
    vendor = "Intel/x86 (OpenVINO CPU plugin)"
    api_version = "1.0"
    torch_device_type = "cpu"
    priority = 10

    def __init__(self) -> None:
        self.models = ModelCache(int(os.environ.get("KVFUSE_CPU_MODEL_CACHE", "32")))
        self._local = threading.local()  # per-thread gather buffers and infer requests, reused

    def probe(self) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability(available=False, reason="openvino is not installed (pip install 'kvfuse[cpu]')")
        try:
            import openvino as ov

            devices = ov.Core().available_devices
        except Exception as exc:
            return Availability(available=False, reason=f"OpenVINO failed to start: {exc}")
        if "CPU" not in devices:
            return Availability(available=False, reason=f"OpenVINO has no CPU plugin (devices: {devices})")
        return Availability(
            available=True, reason="OpenVINO CPU plugin", mode=f"OpenVINO {ov.__version__.split('-')[0]}"
        )

    def capabilities(self) -> Capabilities:
        return Capabilities.full(reach=("cpu",))

    # -- attention ----------------------------------------------------------------------

    def fusion_attention(
        self,
        q: torch.Tensor,
        q_indptr: torch.Tensor,
        q_pos: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        segments: SegmentTable,
        *,
        causal: bool,
        sm_scale: float,
        softcap: float,
        window_left: int,
        rope: RopeConfig | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_q, hq, d = q.shape
        _, page_size, hkv, _ = k_pages.shape
        key = ("cpu", page_size, hkv, d, q_indptr, q_pos, causal, window_left, softcap, rope)
        route = segments.memo(
            key, lambda: _route(q_indptr, q_pos, segments, page_size, hkv, d, causal, window_left, softcap, rope)
        )
        k_rows, v_rows = k_pages.view(-1, hkv, d), v_pages.view(-1, hkv, d)
        style = rope.style if rope is not None else "neox"
        if len(route.decode) == 1 and not route.rest and route.decode[0].q1 - route.decode[0].q0 == num_q:
            # one request, all of it on the decode path: its result is the call's
            o, lse = decode.attend(q, k_rows, v_rows, route.decode[0], sm_scale=sm_scale, softcap=softcap, style=style)
            return o.to(q.dtype), lse
        out = torch.zeros(num_q, hq, d, dtype=torch.float32)
        lse = torch.full((num_q, hq), float("-inf"), dtype=torch.float32)
        for req in route.decode:
            out[req.q0 : req.q1], lse[req.q0 : req.q1] = decode.attend(
                q[req.q0 : req.q1], k_rows, v_rows, req, sm_scale=sm_scale, softcap=softcap, style=style
            )
        if route.rest:
            self._openvino(
                q,
                route,
                k_rows,
                v_rows,
                out,
                lse,
                sm_scale=sm_scale,
                softcap=softcap,
                window_left=window_left,
                rope=rope,
            )
        return out.to(q.dtype), lse

    def _openvino(
        self,
        q: torch.Tensor,
        route: _Route,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        sm_scale: float,
        softcap: float,
        window_left: int,
        rope: RopeConfig | None,
    ) -> None:
        """The requests the decode path does not take, as OpenVINO inferences into out/lse.

        q: [num_q_tokens, num_q_heads, head_dim]; out: the same, fp32; lse: [num_q_tokens, num_q_heads], fp32
        """
        _, hq, d = q.shape
        hkv = k_rows.shape[1]
        rotary = rope.dims(d) if rope is not None else 0
        causal = route.causal
        base = Signature(
            OV_TYPES[q.dtype],
            hq,
            hkv,
            d,
            causal,
            window_left >= 0,
            softcap > 0,
            rope.style if rope is not None else None,
            rotary,
            "f32",
            sm_scale,
        )
        cos, sin = rope.table(d) if rope is not None else (torch.zeros(1, 1), torch.zeros(1, 1))
        sig = base
        try:
            shared = {
                "softcap": np.float32(softcap),
                "window": np.int64(window_left),
                "cos": _ov_input(cos),
                "sin": _ov_input(sin),
            }
            for q0, q1, k0, k1 in route.rest:
                slots, k_pos = route.flat.slots[k0:k1], route.flat.k_pos[k0:k1]
                held: tuple[torch.Tensor, ...] = ()  # the key split gathered last
                for s0, s1 in self._blocks(q0, route.q_pos[q0:q1], k_pos, hq, causal):
                    seen_any, seen_all = self._visibility(k_pos, route.q_pos[s0:s1], causal, window_left)
                    split = (seen_all.nonzero()[:, 0], (seen_any & ~seen_all).nonzero()[:, 0])
                    if not any(x.numel() for x in split):
                        continue  # no query of the block sees any key: out 0, lse -inf
                    if not held or not all(torch.equal(x, y) for x, y in zip(held, split)):
                        held = split
                        sig, inputs = self._key_parts(base, split, slots, k_pos, k_rows, v_rows)
                        inputs.update(shared)
                    inputs.update(q=_ov_input(q[s0:s1]), q_pos=_ov_input(route.q_pos[s0:s1]))
                    result = self._request(sig).infer(inputs, share_outputs=True)
                    out[s0:s1] = torch.from_numpy(result[0])
                    lse[s0:s1] = torch.from_numpy(result[1])
        except RuntimeError as exc:
            raise DeviceError(f"OpenVINO failed in fusion_attention ({sig}): {exc}") from exc

    def _key_parts(
        self,
        base: Signature,
        split: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        k_pos: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
    ) -> tuple[Signature, dict[str, object]]:
        """The signature and K/V inputs for one key split (indices of the keys every query
        of the block sees, and of the rest it may see; keys no query sees are left out, e.g.
        a causal prefill's upper triangle). Keys all queries see go in an unmasked part; the
        rest in a masked one. Each part is gathered head-major."""
        free, rest = split
        if rest.numel() == 0:  # nothing to mask
            sig, parts = replace(base, causal=False, window=False, masked=False), [("k", free)]
        elif free.numel() == 0:
            sig, parts = base, [("k", rest)]
        else:
            sig, parts = replace(base, masked=False, tail=True), [("k", free), ("k_tail", rest)]
        inputs: dict[str, object] = {}
        for i, (name, idx) in enumerate(parts):
            inputs[name] = _ov_input(self._gather(2 * i, k_rows, slots[idx]))
            inputs["v" + name[1:]] = _ov_input(self._gather(2 * i + 1, v_rows, slots[idx]))
            inputs[f"{name}_pos"] = _ov_input(k_pos[idx])
        return sig, inputs

    @staticmethod
    def _visibility(
        k_pos: torch.Tensor, q_pos: torch.Tensor, causal: bool, window_left: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key: may some query of the block see it (a superset), and do all of them."""
        seen_any = torch.ones_like(k_pos, dtype=torch.bool)
        seen_all = seen_any.clone()
        if causal:
            seen_any &= k_pos <= q_pos.max()
            seen_all &= k_pos <= q_pos.min()
        if window_left >= 0:
            seen_any &= q_pos.min() - k_pos <= window_left
            seen_all &= q_pos.max() - k_pos <= window_left
        return seen_any, seen_all

    def _request(self, sig: Signature) -> Any:
        """This thread's infer request on the compiled model of ``sig``, kept: a request holds
        its intermediate buffers, and a fresh one would page-fault them in again."""
        compiled = self.models.get(sig)
        requests = self._local.__dict__.setdefault("requests", collections.OrderedDict())
        held = requests.pop(sig, None)
        if held is None or held[0] is not compiled:  # first use, or recompiled after eviction
            held = (compiled, compiled.create_infer_request())
        requests[sig] = held
        while len(requests) > self.models.capacity:
            requests.popitem(last=False)
        return held[1]

    def _gather(self, which: int, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``rows[slots]`` head-major, ``[num_kv_heads, len(slots), head_dim]``, in a reused
        per-thread staging buffer (a fresh one would cost a page fault per 4 KiB, most of a
        decode step on this class of machine). One ``index_select`` per head: each copies
        whole head_dim rows, and OpenVINO then needs no transposed copy of K or V."""
        n, (hkv, d) = slots.shape[0], rows.shape[1:]
        numel = n * hkv * d
        if numel * rows.element_size() > STAGING_BYTES:
            buf = torch.empty(numel, dtype=rows.dtype)
        else:
            staging = self._local.__dict__.setdefault("staging", [torch.empty(0)] * 4)
            buf = staging[which]
            if buf.dtype != rows.dtype or buf.numel() < numel:
                buf = staging[which] = torch.empty(
                    max(buf.numel() * buf.element_size() // rows.element_size(), numel), dtype=rows.dtype
                )
        out = buf[:numel].view(hkv, n, d)
        for h in range(hkv):
            torch.index_select(rows[:, h], 0, slots, out=out[h])
        return out

    @staticmethod
    def _blocks(q0: int, q_pos: torch.Tensor, k_pos: torch.Tensor, hq: int, causal: bool) -> list[tuple[int, int]]:
        """(start, stop) query blocks of the request whose queries start at ``q0``. Blocks keep
        the fp32 score tensor under SCORE_BYTES (the graph is unfused). Causal queries in
        position order are cut further, into up to 8 blocks of >= 64, where that leaves out
        >= 20 % of the query-key pairs: each block then skips the keys after its last query."""
        nq, nk = q_pos.shape[0], k_pos.shape[0]
        step = max(1, SCORE_BYTES // (4 * hq * nk))
        if causal and nq >= 2 * MIN_BLOCK and bool((q_pos[1:] >= q_pos[:-1]).all()):
            cut = -(-nq // min(MAX_BLOCKS, nq // MIN_BLOCK))
            if cut < step:
                ends = [min(nq, start + cut) for start in range(0, nq, cut)]
                pairs = sum(
                    (end - start) * int((k_pos <= q_pos[end - 1]).sum()) for start, end in zip([0, *ends], ends)
                )
                if pairs <= 0.8 * nq * nk:
                    step = cut
        return [(q0 + start, q0 + min(nq, start + step)) for start in range(0, nq, step)]

    # -- the rest: vectorised torch -----------------------------------------------------

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        lses = torch.stack([lse for _, lse in states])  # [n, tokens, heads] fp32
        lse = torch.logsumexp(lses, dim=0)
        weight = torch.exp(lses - lse).nan_to_num(nan=0.0)
        out = torch.zeros(states[0][0].shape, dtype=torch.float32)
        for w, (o, _) in zip(weight, states):
            out.add_(w[..., None] * o.float())
        return out.to(states[0][0].dtype), lse

    def rope_rerotate(
        self, k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig
    ) -> torch.Tensor:
        cos, sin = rope.table(k.shape[2], scaled=False)
        old, new = old_pos.long(), new_pos.long()
        x = _rope.rotate(k.float(), cos[old], -sin[old], rope.style)
        return _rope.rotate(x, cos[new], sin[new], rope.style).to(k.dtype)

    def blend_select(
        self, k_stored: torch.Tensor, k_fresh: torch.Tensor, count: int, always: torch.Tensor | None
    ) -> torch.Tensor:
        """The contract's own definition is vectorised torch (fp32 scores, a stable sort) and
        runs on any torch device, so it is used as is."""
        return _blend.blend_select_reference(k_stored, k_fresh, count, always)

    def append_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        moves.append_kv(k, v, k_pages, v_pages, slot_mapping)

    def gather_pages(
        self,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
        *,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return moves.gather_pages(k_pages, v_pages, page_ids, out)

    def scatter_pages(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
    ) -> None:
        moves.scatter_pages(k_buf, v_buf, k_pages, v_pages, page_ids)

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
    ) -> TransferHandle:
        ids = dst_ids.tolist()
        if not non_blocking:
            moves.copy_pages(src_k, src_v, src_ids, dst_k, dst_v, dst_ids)
            return TransferHandle(ids)
        return TransferHandle(ids, _copier.submit(moves.copy_pages, src_k, src_v, src_ids, dst_k, dst_v, dst_ids))
