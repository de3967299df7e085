"""fusion_attention as an OpenVINO model, compiled once per shape signature.

The signature fixes heads, head_dim, dtype and the feature flags (causal, window, softcap,
RoPE style and rotary dim); the token counts stay dynamic, so one compiled model serves
every sequence length. Compiled models live in a bounded LRU cache.

The graph, per request (q: [nq, Hq, D], k/v: [nk, Hkv, D], positions q_pos/k_pos):
rotate q and k with rows of the fp32 RoPE table (Gather), group the q heads by kv head
(GQA without repeating K/V), score = sm_scale * q·k (soft-capped), mask by position,
then an explicit softmax whose max and sum also give the lse (natural log). Rows with no
visible key get out = 0, lse = -inf. K and V arrive head-major ([Hkv, nk, D]) so neither
MatMul needs a transposed copy of them, and each kv head's queries of all its q heads form
one MatMul: a decode step reads every key and value once.
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
    """What a compiled model is specialised for; token counts are dynamic."""

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


def build_model(sig: Signature) -> Any:
    """The OpenVINO model of one signature. Inputs: q [nq, Hq, D]; k, v [Hkv, nk, D] (head-major,
    as the device gathers them); q_pos, k_pos (i64); sm_scale, softcap (f32 scalars); window
    (i64 scalar); cos, sin ([max_position, rotary_dim/2] f32). Outputs: out [nq, Hq, D] f32,
    lse [nq, Hq] f32.

    bf16 q/k/v go into both MatMuls as bf16 (AVX-512 BF16 dot products, fp32 accumulation,
    the probabilities rounded to bf16 for the second one, as GPU flash kernels do) - except
    that q and k rotated by RoPE stay f32; every other op, the softmax and its lse included,
    runs in f32. fp16 is upcast (no fp16 dot here).
    """
    import openvino as ov
    import openvino.opset13 as op

    hq, hkv, d = sig.num_q_heads, sig.num_kv_heads, sig.head_dim
    group = hq // hkv
    elem = getattr(ov.Type, sig.dtype)
    dot = ov.Type.bf16 if sig.dtype == "bf16" else ov.Type.f32  # MatMul operand type
    f32 = ov.Type.f32
    q = op.parameter([-1, hq, d], elem, name="q")
    k = op.parameter([hkv, -1, d], elem, name="k")
    v = op.parameter([hkv, -1, d], elem, name="v")
    q_pos = op.parameter([-1], ov.Type.i64, name="q_pos")
    k_pos = op.parameter([-1], ov.Type.i64, name="k_pos")
    sm_scale = op.parameter([], f32, name="sm_scale")
    softcap = op.parameter([], f32, name="softcap")
    window = op.parameter([], ov.Type.i64, name="window")
    cos = op.parameter([-1, max(sig.rotary_dim // 2, 1)], f32, name="cos")
    sin = op.parameter([-1, max(sig.rotary_dim // 2, 1)], f32, name="sin")

    def cast(x: Any, t: Any) -> Any:
        return x if x.get_element_type() == t else op.convert(x, t)

    def i64(*values: int) -> Any:
        return op.constant(np.array(values, dtype=np.int64))

    # -- rotate in f32 with rows of the fp32 table, then to the MatMul operand type
    qd, kd, vd = cast(q, dot), cast(k, dot), cast(v, dot)
    if sig.rope_style is not None:

        def rows(table: Any, pos: Any, axis: int) -> Any:
            return op.unsqueeze(op.gather(table, pos, np.array(0)), np.array([axis]))

        r, style = sig.rotary_dim, sig.rope_style
        # rotated q and k stay f32: rounding them to bf16 would cost the lse its tolerance
        qd = _rope(op, cast(q, f32), rows(cos, q_pos, 1), rows(sin, q_pos, 1), style, r, d)
        kd = _rope(op, cast(k, f32), rows(cos, k_pos, 0), rows(sin, k_pos, 0), style, r, d)

    # -- GQA: the q rows (token, group) of one kv head form one MatMul against its keys
    nq = op.shape_of(q_pos)
    qg = op.reshape(op.transpose(op.reshape(qd, i64(0, hkv, group, d), True), i64(1, 0, 2, 3)), i64(hkv, -1, d), False)
    score2 = op.matmul(qg, kd, False, True)  # [Hkv, nq * group, nk]
    score = op.multiply(cast(op.reshape(score2, op.concat([i64(hkv), nq, i64(group, -1)], 0), False), f32), sm_scale)
    if sig.softcap:
        score = op.multiply(op.tanh(op.divide(score, softcap)), softcap)

    # -- visibility by position, never by index: [nq, 1, nk] against [Hkv, nq, group, nk]
    qp = op.unsqueeze(q_pos, i64(1))
    kp = op.unsqueeze(k_pos, i64(0))
    visible = None
    if sig.causal:
        visible = op.less_equal(kp, qp)
    if sig.window:
        near = op.less_equal(op.subtract(qp, kp), window)
        visible = near if visible is None else op.logical_and(visible, near)
    if visible is not None:
        score = op.select(op.unsqueeze(visible, i64(1)), score, op.constant(np.float32(-np.inf)))

    # -- softmax with explicit max and sum; lse = max + log(sum)
    row_max = op.reduce_max(score, i64(-1), True)
    row_max = op.select(op.is_finite(row_max), row_max, op.constant(np.float32(0.0)))
    weight = op.exp(op.subtract(score, row_max))
    total = op.reduce_sum(weight, i64(-1), True)  # 0 for a row with no visible key
    lse = op.add(row_max, op.log(total))  # log(0) = -inf
    pv = op.matmul(cast(op.reshape(weight, op.shape_of(score2), False), dot), vd, False, False)
    out = op.divide(op.reshape(cast(pv, f32), op.concat([i64(hkv), nq, i64(group, d)], 0), False), total)
    out = op.select(op.greater(total, op.constant(np.float32(0.0))), out, op.constant(np.float32(0.0)))

    # -- [Hkv, nq, group, *] back to [nq, Hq, D] and [nq, Hq]
    out = op.reshape(op.transpose(out, i64(1, 0, 2, 3)), i64(-1, hq, d), False)
    lse = op.reshape(op.transpose(lse, i64(1, 0, 2, 3)), i64(-1, hq), False)
    return ov.Model([out, lse], [q, k, v, q_pos, k_pos, sm_scale, softcap, window, cos, sin], "kvfuse_fusion_attention")


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
