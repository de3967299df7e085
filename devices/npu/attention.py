"""fusion_attention, merge_states, rope_rerotate and blend_select as ONNX graphs of
standard opset ops only (MatMul, Where, ReduceMax/ReduceSum, Exp/Log, Tanh, Gather, TopK,
Unique, ...), so any execution provider can run them. Token counts are dynamic dims."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kvfuse.devices.npu.runtime import Graph
from onnx import TensorProto

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
NEG_INF = np.float32(-np.inf)


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _rope(g: Graph, x: str, cos: str, sin: str, style: str, r: int, d: int) -> str:
    """Rotate the first r dims of x: [n, heads, d] (f32) by cos/sin rows: [n, 1, r/2]."""

    def sl(start: int, stop: int, step: int = 1) -> str:
        return g.op("Slice", x, g.const(_i64(start)), g.const(_i64(stop)), g.const(_i64(2)), g.const(_i64(step)))

    def turn(a: str, b: str) -> tuple[str, str]:  # (a cos - b sin, b cos + a sin)
        return (
            g.op("Sub", g.op("Mul", a, cos), g.op("Mul", b, sin)),
            g.op("Add", g.op("Mul", b, cos), g.op("Mul", a, sin)),
        )

    if style == "neox":
        parts = list(turn(sl(0, r // 2), sl(r // 2, r)))
    else:
        re, ro = turn(sl(0, r, 2), sl(1, r, 2))
        pair = g.op("Concat", g.op("Unsqueeze", re, g.const(_i64(3))), g.op("Unsqueeze", ro, g.const(_i64(3))), axis=3)
        dims = g.op(
            "Concat", g.op("Slice", g.op("Shape", x), g.const(_i64(0)), g.const(_i64(2))), g.const(_i64(r)), axis=0
        )
        parts = [g.op("Reshape", pair, dims)]
    if r < d:
        parts.append(sl(r, d))
    return g.op("Concat", *parts, axis=2)


def _rows(g: Graph, table: str, pos: str) -> str:
    return g.op("Unsqueeze", g.op("Gather", table, pos, axis=0), g.const(_i64(1)))  # [n, 1, r/2]


@dataclass(frozen=True)
class AttentionSignature:
    elem: int  # ONNX element type of q/k/v
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    window: bool
    softcap: bool
    rope_style: str | None
    rotary_dim: int


def attention_graph(sig: AttentionSignature) -> bytes:
    """Inputs q [nq, Hq, D], k/v [nk, Hkv, D], q_pos/k_pos i64, sm_scale/softcap f32 [],
    window i64 [], cos/sin f32 [max_position, r/2]. Outputs out [nq, Hq, D] f32, lse [nq, Hq] f32."""
    hq, hkv, d = sig.num_q_heads, sig.num_kv_heads, sig.head_dim
    group = hq // hkv
    g = Graph("kvfuse_fusion_attention")
    q, k, v = (g.input(n, sig.elem, [f"n{n}", h, d]) for n, h in (("q", hq), ("k", hkv), ("v", hkv)))
    q_pos, k_pos = g.input("q_pos", I64, ["nq"]), g.input("k_pos", I64, ["nk"])
    sm_scale, softcap, window = g.input("sm_scale", F32, []), g.input("softcap", F32, []), g.input("window", I64, [])
    cos, sin = g.input("cos", F32, ["P", "R"]), g.input("sin", F32, ["P", "R"])
    # -- upcast; rotate with rows of the fp32 table
    qf, kf, vf = (g.op("Cast", x, to=F32) for x in (q, k, v))
    if sig.rope_style is not None:
        qf = _rope(g, qf, _rows(g, cos, q_pos), _rows(g, sin, q_pos), sig.rope_style, sig.rotary_dim, d)
        kf = _rope(g, kf, _rows(g, cos, k_pos), _rows(g, sin, k_pos), sig.rope_style, sig.rotary_dim, d)
    # -- GQA: q [Hkv, group, nq, D] against k^T [Hkv, 1, D, nk] and v [Hkv, 1, nk, D]
    qg = g.op("Transpose", g.op("Reshape", qf, g.const(_i64(0, hkv, group, d))), perm=[1, 2, 0, 3])
    kt = g.op("Unsqueeze", g.op("Transpose", kf, perm=[1, 2, 0]), g.const(_i64(1)))
    vg = g.op("Unsqueeze", g.op("Transpose", vf, perm=[1, 0, 2]), g.const(_i64(1)))
    score = g.op("Mul", g.op("MatMul", qg, kt), sm_scale)  # [Hkv, group, nq, nk]
    if sig.softcap:
        score = g.op("Mul", g.op("Tanh", g.op("Div", score, softcap)), softcap)
    # -- visibility by position
    qp = g.op("Unsqueeze", q_pos, g.const(_i64(1)))
    kp = g.op("Unsqueeze", k_pos, g.const(_i64(0)))
    visible = g.op("LessOrEqual", kp, qp) if sig.causal else None
    if sig.window:
        near = g.op("LessOrEqual", g.op("Sub", qp, kp), window)
        visible = near if visible is None else g.op("And", visible, near)
    if visible is not None:
        score = g.op("Where", visible, score, g.const(NEG_INF))
    # -- softmax with explicit max and sum; lse = max + log(sum)
    axis = g.const(_i64(-1))
    row_max = g.op("ReduceMax", score, axis, keepdims=1)
    row_max = g.op("Where", g.op("IsInf", row_max), g.const(np.float32(0)), row_max)
    weight = g.op("Exp", g.op("Sub", score, row_max))
    total = g.op("ReduceSum", weight, axis, keepdims=1)
    lse = g.op("Add", row_max, g.op("Log", total))  # log(0) = -inf for a row with no visible key
    out = g.op("Div", g.op("MatMul", weight, vg), total)
    out = g.op("Where", g.op("Greater", total, g.const(np.float32(0))), out, g.const(np.float32(0)))
    # -- back to [nq, Hq, D] and [nq, Hq]
    g.op("Reshape", g.op("Transpose", out, perm=[2, 0, 1, 3]), g.const(_i64(0, hq, d)), out="out")
    g.op("Reshape", g.op("Transpose", lse, perm=[2, 0, 1, 3]), g.const(_i64(0, hq)), out="lse")
    g.output("out", F32, ["nq", hq, d])
    g.output("lse", F32, ["nq", hq])
    return g.model()


def merge_graph(elem: int) -> bytes:
    """Inputs outs [n, T, H, D] (elem), lses [n, T, H] f32. Outputs out (elem), lse f32."""
    g = Graph("kvfuse_merge_states")
    outs, lses = g.input("outs", elem, ["n", "T", "H", "D"]), g.input("lses", F32, ["n", "T", "H"])
    zero = g.const(_i64(0))
    top = g.op("ReduceMax", lses, zero, keepdims=1)
    top = g.op("Where", g.op("IsInf", top), g.const(np.float32(0)), top)
    weight = g.op("Exp", g.op("Sub", lses, top))  # [n, T, H]
    total = g.op("ReduceSum", weight, zero, keepdims=1)
    g.op("Squeeze", g.op("Add", top, g.op("Log", total)), zero, out="lse")
    share = g.op(
        "Where", g.op("Greater", total, g.const(np.float32(0))), g.op("Div", weight, total), g.const(np.float32(0))
    )
    mixed = g.op(
        "ReduceSum",
        g.op("Mul", g.op("Unsqueeze", share, g.const(_i64(3))), g.op("Cast", outs, to=F32)),
        zero,
        keepdims=0,
    )
    g.op("Cast", mixed, to=elem, out="out")
    g.output("out", elem, ["T", "H", "D"])
    g.output("lse", F32, ["T", "H"])
    return g.model()


def rerotate_graph(elem: int, style: str, r: int, d: int) -> bytes:
    """Inputs k [n, H, D] (elem), old_pos/new_pos i64, cos/sin f32. Output k2 (elem)."""
    g = Graph("kvfuse_rope_rerotate")
    k = g.input("k", elem, ["n", "H", d])
    old, new = g.input("old_pos", I64, ["n"]), g.input("new_pos", I64, ["n"])
    cos, sin = g.input("cos", F32, ["P", "R"]), g.input("sin", F32, ["P", "R"])
    back = _rope(g, g.op("Cast", k, to=F32), _rows(g, cos, old), g.op("Neg", _rows(g, sin, old)), style, r, d)
    g.op("Cast", _rope(g, back, _rows(g, cos, new), _rows(g, sin, new), style, r, d), to=elem, out="k2")
    g.output("k2", elem, ["n", "H", d])
    return g.model()


def blend_graph(elem: int) -> bytes:
    """Inputs k_stored, k_fresh [n, H, D] (elem), count i64 [1], always i64 [m].
    Output indices i64: TopK (ties → lower index, per the ONNX spec) + always, Unique sorted."""
    g = Graph("kvfuse_blend_select")
    stored, fresh = g.input("k_stored", elem, ["n", "H", "D"]), g.input("k_fresh", elem, ["n", "H", "D"])
    count, always = g.input("count", I64, [1]), g.input("always", I64, ["m"])
    diff = g.op("Sub", g.op("Cast", fresh, to=F32), g.op("Cast", stored, to=F32))
    score = g.op("ReduceSum", g.op("Mul", diff, diff), g.const(_i64(1, 2)), keepdims=0)
    _, top = g.ops("TopK", score, count, outs=2, axis=0, largest=1, sorted=1)
    g.op("Unique", g.op("Concat", top, always, axis=0), out="indices", sorted=1)
    g.output("indices", I64, ["m2"])
    return g.model()
