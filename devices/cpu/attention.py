"""fusion_attention as an OpenVINO model, compiled once per shape signature.

The signature fixes heads, head_dim, dtype and the feature flags (causal, window, softcap,
RoPE style and rotary dim); the token counts stay dynamic, so one compiled model serves
every sequence length. Compiled models live in a bounded LRU cache.

The graph, per request (q: [nq, Hq, D], k/v: [nk, Hkv, D], positions q_pos/k_pos):
rotate q and k with rows of the fp32 RoPE table (Gather), group the q heads by kv head
(GQA without repeating K/V), score = sm_scale * q·k (soft-capped), mask by position,
then an explicit softmax whose max and sum also give the lse (natural log). Rows with no
visible key get out = 0, lse = -inf.
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
    """The OpenVINO model of one signature. Inputs: q, k, v, q_pos, k_pos (i64), sm_scale,
    softcap (f32 scalars), window (i64 scalar), cos, sin ([max_position, rotary_dim/2] f32).
    Outputs: out [nq, Hq, D] f32, lse [nq, Hq] f32."""
    import openvino as ov
    import openvino.opset13 as op

    hq, hkv, d = sig.num_q_heads, sig.num_kv_heads, sig.head_dim
    group = hq // hkv
    elem = getattr(ov.Type, sig.dtype)
    q = op.parameter([-1, hq, d], elem, name="q")
    k = op.parameter([-1, hkv, d], elem, name="k")
    v = op.parameter([-1, hkv, d], elem, name="v")
    q_pos = op.parameter([-1], ov.Type.i64, name="q_pos")
    k_pos = op.parameter([-1], ov.Type.i64, name="k_pos")
    sm_scale = op.parameter([], ov.Type.f32, name="sm_scale")
    softcap = op.parameter([], ov.Type.f32, name="softcap")
    window = op.parameter([], ov.Type.i64, name="window")
    cos = op.parameter([-1, max(sig.rotary_dim // 2, 1)], ov.Type.f32, name="cos")
    sin = op.parameter([-1, max(sig.rotary_dim // 2, 1)], ov.Type.f32, name="sin")
    f32 = ov.Type.f32

    # -- upcast; rotate with rows of the fp32 table
    qf, kf, vf = (op.convert(x, f32) if sig.dtype != "f32" else x for x in (q, k, v))
    if sig.rope_style is not None:

        def rows(table: Any, pos: Any) -> Any:
            return op.unsqueeze(op.gather(table, pos, np.array(0)), np.array([1]))  # [n, 1, r/2]

        qf = _rope(op, qf, rows(cos, q_pos), rows(sin, q_pos), sig.rope_style, sig.rotary_dim, d)
        kf = _rope(op, kf, rows(cos, k_pos), rows(sin, k_pos), sig.rope_style, sig.rotary_dim, d)

    # -- GQA: q as [Hkv, group, nq, D] against k/v as [Hkv, 1, nk, D]
    qg = op.transpose(op.reshape(qf, np.array([0, hkv, group, d]), True), np.array([1, 2, 0, 3]))
    kg = op.unsqueeze(op.transpose(kf, np.array([1, 0, 2])), np.array([1]))
    vg = op.unsqueeze(op.transpose(vf, np.array([1, 0, 2])), np.array([1]))
    score = op.multiply(op.matmul(qg, kg, False, True), sm_scale)  # [Hkv, group, nq, nk]
    if sig.softcap:
        score = op.multiply(op.tanh(op.divide(score, softcap)), softcap)

    # -- visibility by position, never by index
    qp = op.unsqueeze(q_pos, np.array([1]))  # [nq, 1]
    kp = op.unsqueeze(k_pos, np.array([0]))  # [1, nk]
    visible = None
    if sig.causal:
        visible = op.less_equal(kp, qp)
    if sig.window:
        near = op.less_equal(op.subtract(qp, kp), window)
        visible = near if visible is None else op.logical_and(visible, near)
    if visible is not None:
        score = op.select(visible, score, op.constant(np.float32(-np.inf)))

    # -- softmax with explicit max and sum; lse = max + log(sum)
    row_max = op.reduce_max(score, np.array([-1]), True)
    row_max = op.select(op.is_finite(row_max), row_max, op.constant(np.float32(0.0)))
    weight = op.exp(op.subtract(score, row_max))
    total = op.reduce_sum(weight, np.array([-1]), True)  # 0 for a row with no visible key
    lse = op.add(row_max, op.log(total))  # log(0) = -inf
    out = op.divide(op.matmul(weight, vg, False, False), total)
    out = op.select(op.greater(total, op.constant(np.float32(0.0))), out, op.constant(np.float32(0.0)))

    # -- back to [nq, Hq, D] and [nq, Hq]
    out = op.reshape(op.transpose(out, np.array([2, 0, 1, 3])), np.array([0, hq, d]), True)
    lse = op.reshape(op.transpose(lse, np.array([2, 0, 1, 3])), np.array([0, hq]), True)
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
