"""The KV moves as ONNX graphs: Gather for reads, ScatterND for writes. Writes bind the
graph's output to the pool's own memory (ScatterND's data input and output alias), so a
move touches only the pages it names. ONNX Runtime does not document that aliasing: the
device uses it only on the providers in ``ALIASING_PROVEN``, each proven by a test in
``tests/devices/npu`` (bit-exact writes, in place, every other page untouched)."""

from __future__ import annotations

import numpy as np
from kvfuse.devices.npu.runtime import Graph
from onnx import TensorProto

I64 = TensorProto.INT64
ALIASING_PROVEN = frozenset({"CPUExecutionProvider"})
POOL = ["N", "P", "H", "D"]


def gather_graph(elem: int) -> bytes:
    """k_pages, v_pages [N, P, H, D]; ids [n] → k_buf, v_buf [n, P, H, D]."""
    g = Graph("kvfuse_gather_pages")
    ids = g.input("ids", I64, ["n"])
    for kv in "kv":
        g.op("Gather", g.input(f"{kv}_pages", elem, POOL), ids, axis=0, out=f"{kv}_buf")
        g.output(f"{kv}_buf", elem, ["n", "P", "H", "D"])
    return g.model()


def scatter_graph(elem: int) -> bytes:
    """k_pages, v_pages [N, P, H, D]; ids [n, 1]; k_buf, v_buf [n, P, H, D] → k_out, v_out."""
    g = Graph("kvfuse_scatter_pages")
    ids = g.input("ids", I64, ["n", 1])
    for kv in "kv":
        pool, buf = g.input(f"{kv}_pages", elem, POOL), g.input(f"{kv}_buf", elem, ["n", "P", "H", "D"])
        g.op("ScatterND", pool, ids, buf, out=f"{kv}_out")
        g.output(f"{kv}_out", elem, POOL)
    return g.model()


def append_graph(elem: int) -> bytes:
    """k_slots, v_slots [S, H, D] (the pools by slot); k, v [n, H, D]; slots [n], < 0 skips."""
    g = Graph("kvfuse_append_kv")
    slots = g.input("slots", I64, ["n"])
    keep = g.op("GreaterOrEqual", slots, g.const(np.int64(0)))
    rows = g.op("Squeeze", g.op("NonZero", keep), g.const(np.array([0])))  # tokens to write (Gather: any dtype)
    idx = g.op("Unsqueeze", g.op("Gather", slots, rows, axis=0), g.const(np.array([1])))
    for kv in "kv":
        pool, tokens = g.input(f"{kv}_slots", elem, ["S", "H", "D"]), g.input(kv, elem, ["n", "H", "D"])
        g.op("ScatterND", pool, idx, g.op("Gather", tokens, rows, axis=0), out=f"{kv}_out")
        g.output(f"{kv}_out", elem, ["S", "H", "D"])
    return g.model()


def copy_graph(elem: int) -> bytes:
    """src_k, src_v [N, P, H, D]; src_ids [n]; dst_k, dst_v [M, P, H, D]; dst_ids [n, 1]."""
    g = Graph("kvfuse_copy_pages")
    src_ids, dst_ids = g.input("src_ids", I64, ["n"]), g.input("dst_ids", I64, ["n", 1])
    for kv in "kv":
        src, dst = g.input(f"src_{kv}", elem, POOL), g.input(f"dst_{kv}", elem, ["M", "P", "H", "D"])
        g.op("ScatterND", dst, dst_ids, g.op("Gather", src, src_ids, axis=0), out=f"{kv}_out")
        g.output(f"{kv}_out", elem, ["M", "P", "H", "D"])
    return g.model()
