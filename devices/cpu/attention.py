"""fusion_attention as an OpenVINO model, compiled once per shape signature.

The signature fixes heads, head_dim, dtype, sm_scale, the feature flags (causal, window,
softcap, RoPE style and rotary dim) and how the keys are split into parts; the token
counts stay dynamic, so one compiled model serves every sequence length. Compiled models
live in a bounded LRU cache.

The graph, per request (q: [nq, Hq, D], k/v: [Hkv, nk, D], positions q_pos/k_pos):
rotate q and k with rows of the fp32 RoPE table (Gather), group the q heads by kv head
(GQA without repeating K/V), score = sm_scale * q·k (soft-capped), mask by position,
then an explicit softmax whose max and sum also give the lse (natural log). Rows with no
visible key get out = 0, lse = -inf. K and V arrive head-major so neither MatMul needs a
transposed copy of them, and each kv head's queries of all its q heads form one MatMul: a
decode step reads every key and value once.

The graph is unfused, so every elementwise op is a pass over the score tensor. Keys every
query sees (a prefill's stored context, all of a decode step's keys) therefore come as
their own part that is never masked; only the rest (the live tokens) pays for the mask.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

OV_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Signature:
    """What a compiled model is specialised for; token counts are dynamic.

    The device hands the keys of one inference over in up to two parts: ``k`` holds keys
    every query of the inference sees (``masked=False``: no mask is built for them at all)
    or, for ``masked=True``, keys masked by position; ``tail=True`` adds a second, masked
    part ``k_tail`` (e.g. the live tokens of a prefill under its stored context).
    """

    dtype: str  # OpenVINO element type of q/k/v: f32, f16, bf16
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    window: bool
    softcap: bool
    rope_style: str | None  # None, "neox" or "gptj"
    rotary_dim: int
    precision: str  # OpenVINO INFERENCE_PRECISION_HINT
    sm_scale: float  # a constant of the graph
    masked: bool = True
    tail: bool = False


def _rope(op: Any, x: Any, cos: Any, sin: Any, style: str, r: int, d: int) -> Any:
    """Rotate the first r dims of x: [n, heads, d] by cos/sin: [n, 1, r/2]."""

    def sl(start: int, stop: int, step: int = 1) -> Any:
        return op.slice(x, np.array([start]), np.array([stop]), np.array([step]), np.array([2]))

    if style == "neox":
        x1, x2 = sl(0, r // 2), sl(r // 2, r)
        parts = [
            op.subtract(op.multiply(x1, cos), op.multiply(x2, sin)),
            op.add(op.multiply(x2, cos), op.multiply(x1, sin)),
        ]
    else:
        xe, xo = sl(0, r, 2), sl(1, r, 2)
        re = op.subtract(op.multiply(xe, cos), op.multiply(xo, sin))
        ro = op.add(op.multiply(xo, cos), op.multiply(xe, sin))
        pair = op.concat([op.unsqueeze(re, np.array([3])), op.unsqueeze(ro, np.array([3]))], 3)  # [n, h, r/2, 2]
        shape = op.concat(
            [
                op.slice(op.shape_of(x), np.array([0]), np.array([2]), np.array([1])),
                op.constant(np.array([r], dtype=np.int64)),
            ],
            0,
        )
        parts = [op.reshape(pair, shape, False)]
    if r < d:
        parts.append(sl(r, d))
    return op.concat(parts, 2)


def _sum(op: Any, terms: list[Any]) -> Any:
    return terms[0] if len(terms) == 1 else op.add(terms[0], terms[1])


def build_model(sig: Signature) -> Any:
    """The OpenVINO model of one signature. Inputs: q [nq, Hq, D]; k, v [Hkv, nk, D] (head-major,
    as the device gathers them) and k_pos; with ``sig.tail`` also k_tail, v_tail [Hkv, nt, D]
    and k_tail_pos; q_pos; softcap (f32 scalar); window (i64 scalar); cos, sin
    ([max_position, rotary_dim/2] f32). Positions are i64. Outputs: out [nq, Hq, D] f32,
    lse [nq, Hq] f32.

    Scores are f32 end to end: q and k go into the first MatMul as f32 (a bf16 MatMul here
    rounds its result, the scores, to bf16, which costs real-sized logits their tolerance).
    For bf16 the second MatMul takes bf16 probabilities and values (AVX-512 BF16 dot
    products, fp32 accumulation), as GPU flash kernels do. fp16 is upcast throughout.
    """
    import openvino as ov
    import openvino.opset13 as op

    hq, hkv, d = sig.num_q_heads, sig.num_kv_heads, sig.head_dim
    group = hq // hkv
    elem = getattr(ov.Type, sig.dtype)
    dot = ov.Type.bf16 if sig.dtype == "bf16" else ov.Type.f32  # second MatMul's operand type
    f32, i64t = ov.Type.f32, ov.Type.i64
    q = op.parameter([-1, hq, d], elem, name="q")
    q_pos = op.parameter([-1], i64t, name="q_pos")
    softcap = op.parameter([], f32, name="softcap")
    window = op.parameter([], i64t, name="window")
    cos = op.parameter([-1, max(sig.rotary_dim // 2, 1)], f32, name="cos")
    sin = op.parameter([-1, max(sig.rotary_dim // 2, 1)], f32, name="sin")
    params = [q, q_pos, softcap, window, cos, sin]

    def cast(x: Any, t: Any) -> Any:
        return x if x.get_element_type() == t else op.convert(x, t)

    def i64(*values: int) -> Any:
        return op.constant(np.array(values, dtype=np.int64))

    def rows(table: Any, pos: Any, axis: int) -> Any:  # table rows at pos, as [.., 1, ..] at axis
        return op.unsqueeze(op.gather(table, pos, np.array(0)), np.array([axis]))

    # -- q in f32, rotated, scaled (on the scores, OpenVINO would move the constant onto K:
    # a pass over every key); rows (token, group) per kv head: [Hkv, nq * group, D]
    qd = cast(q, f32)
    if sig.rope_style is not None:
        qd = _rope(op, qd, rows(cos, q_pos, 1), rows(sin, q_pos, 1), sig.rope_style, sig.rotary_dim, d)
    qd = op.multiply(qd, op.constant(np.float32(sig.sm_scale)))
    nq = op.shape_of(q_pos)
    qg = op.reshape(op.transpose(op.reshape(qd, i64(0, hkv, group, d), True), i64(1, 0, 2, 3)), i64(hkv, -1, d), False)
    # each score row's query position: q_pos repeated group times, [nq * group, 1]
    row_pos = op.reshape(op.broadcast(op.unsqueeze(q_pos, i64(1)), op.concat([nq, i64(group)], 0)), i64(-1, 1), False)

    def part(name: str, masked: bool) -> tuple[Any, Any]:
        """Scores [Hkv, nq * group, n] (f32) of one key part, and its values."""
        k = op.parameter([hkv, -1, d], elem, name=name)
        v = op.parameter([hkv, -1, d], elem, name=name.replace("k", "v", 1))
        k_pos = op.parameter([-1], i64t, name=f"{name}_pos")
        params.extend([k, v, k_pos])
        kd = cast(k, f32)
        if sig.rope_style is not None:
            kd = _rope(op, kd, rows(cos, k_pos, 0), rows(sin, k_pos, 0), sig.rope_style, sig.rotary_dim, d)
        score = op.matmul(qg, kd, False, True)
        if sig.softcap:
            score = op.multiply(op.tanh(op.divide(score, softcap)), softcap)
        if masked:  # visibility by position, never by index
            kp = op.unsqueeze(k_pos, i64(0))
            visible = op.less_equal(kp, row_pos) if sig.causal else None
            if sig.window:
                near = op.less_equal(op.subtract(row_pos, kp), window)
                visible = near if visible is None else op.logical_and(visible, near)
            if visible is not None:
                score = op.select(visible, score, op.constant(np.float32(-np.inf)))
        return score, cast(v, dot)

    parts = [part("k", sig.masked)] + ([part("k_tail", True)] if sig.tail else [])

    # -- one softmax over all parts, explicit max and sum; lse = max + log(sum)
    row_max = op.reduce_max(parts[0][0], i64(-1), True)
    if sig.tail:
        row_max = op.maximum(row_max, op.reduce_max(parts[1][0], i64(-1), True))
    if sig.masked:  # a row may see no key at all: keep max finite, out = 0 and lse = -inf there
        row_max = op.select(op.is_finite(row_max), row_max, op.constant(np.float32(0.0)))
    weights = [op.exp(op.subtract(score, row_max)) for score, _ in parts]
    total = op.reduce_sum(weights[0], i64(-1), True)  # 0 for a row with no visible key
    if sig.tail:
        total = op.add(total, op.reduce_sum(weights[1], i64(-1), True))
    lse = op.add(row_max, op.log(total))  # log(0) = -inf
    terms = [cast(op.matmul(cast(w, dot), v, False, False), f32) for w, (_, v) in zip(weights, parts)]
    out = op.divide(_sum(op, terms), total)  # normalise the [.., D] output, not the [.., nk] weights
    if sig.masked:
        out = op.select(op.greater(total, op.constant(np.float32(0.0))), out, op.constant(np.float32(0.0)))

    # -- [Hkv, nq * group, *] back to [nq, Hq, D] and [nq, Hq]
    out = op.reshape(out, op.concat([i64(hkv), nq, i64(group, d)], 0), False)
    out = op.reshape(op.transpose(out, i64(1, 0, 2, 3)), i64(-1, hq, d), False)
    lse = op.reshape(lse, op.concat([i64(hkv), nq, i64(group)], 0), False)
    lse = op.reshape(op.transpose(lse, i64(1, 0, 2)), i64(-1, hq), False)
    return ov.Model([out, lse], params, "kvfuse_fusion_attention")


class ModelCache:
    """Compiled models by signature, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.compiles = 0
        self._models: collections.OrderedDict[Signature, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._core: Any = None

    def config(self, sig: Signature) -> dict[str, str]:
        return {"INFERENCE_PRECISION_HINT": sig.precision}

    def get(self, sig: Signature) -> Any:
        """The compiled model for ``sig`` (compiled on first use)."""
        with self._lock:
            model = self._models.get(sig)
            if model is not None:
                self._models.move_to_end(sig)
                return model
            if self._core is None:
                import openvino as ov

                self._core = ov.Core()
            model = self._core.compile_model(build_model(sig), "CPU", self.config(sig))
            self.compiles += 1
            self._models[sig] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, sig: Signature) -> bool:
        return sig in self._models
