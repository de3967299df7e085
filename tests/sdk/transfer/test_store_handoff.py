"""A chunk prefilled into one store's pool reaches another's over a page transport (the
prefill → decode hand-off): the receiver lends pages, the sender sends the chunk's pages
of every layer (``KVPool.flat``), the receiver commits them under the chunk's key and then
holds exactly the sender's KV, every layer, nothing else touched. Here the receiver is a
second process; its pool's bytes come back as digests."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from kvfuse.store import KVPool, Namespace, TieredStore
from kvfuse.transfer import TcpTransport

NS = Namespace(model_id="tiny", num_layers=3, num_kv_heads=2, head_dim=8, dtype="bf16", page_size=4)

RECEIVER = r"""
import hashlib, json, sys
import torch
from kvfuse.store import KVPool, Namespace, TieredStore
from kvfuse.transfer import TcpTransport
ns = Namespace(**json.loads(sys.argv[1]))
store = TieredStore(ns, KVPool(ns, 20), host_bytes=0)
store.allocate(20)  # 5 pages another request holds: the chunk lands after them
transport = TcpTransport()
desc = transport.register_pool(*store.pool.flat())
pages = store.allocate(int(sys.argv[2]))
print(json.dumps({"desc": desc, "dst": store.pool.flat_ids(pages), "pages": pages}), flush=True)
cmd = json.loads(sys.stdin.readline())  # the sender's word that its send completed
kept = store.commit(cmd["key"], pages, int(sys.argv[2]))
got = store.fetch(cmd["key"])
k, v = store.pool.read(got, int(sys.argv[2]))
def digest(t):
    return hashlib.blake2b(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
others = [p for p in range(20) if p not in pages]
untouched = not store.pool.k[:, others].any() and not store.pool.v[:, others].any()
print(json.dumps({"k": digest(k), "v": digest(v), "kept": kept, "rest_zero": untouched}), flush=True)
transport.close()
"""


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.blake2b(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def test_a_chunk_prefilled_in_one_process_is_committed_and_served_in_another() -> None:
    tokens = 10
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(NS.chunk_shape(tokens), generator=g).to(torch.bfloat16) for _ in range(2))
    sender_store = TieredStore(NS, KVPool(NS, 16), host_bytes=0)
    sender_store.allocate(7)  # 2 pages: the chunk's are not the first ones here either
    sender_store.put("doc", k, v)
    src_pages = sender_store.fetch("doc")
    assert src_pages is not None

    spec = {"model_id": "tiny", "num_layers": 3, "num_kv_heads": 2, "head_dim": 8, "dtype": "bf16", "page_size": 4}
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, json.dumps(spec), str(tokens)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    transport = TcpTransport()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        offer = json.loads(proc.stdout.readline())
        assert offer["pages"] != src_pages  # different page ids on each side
        src = sender_store.pool.flat_ids(src_pages)
        transport.send_pages(*sender_store.pool.flat(), src, offer["desc"], offer["dst"]).wait(timeout=30)
        proc.stdin.write(json.dumps({"key": "doc"}) + "\n")
        proc.stdin.flush()
        got = json.loads(proc.stdout.readline())
    finally:
        transport.close()
        proc.kill()
        proc.wait()
    assert got["kept"] == offer["pages"]
    assert (got["k"], got["v"]) == (_digest(k), _digest(v))  # every layer, bit-exact
    assert got["rest_zero"]  # pages the chunk was not given: untouched


def test_flat_pages_are_every_layers_pages() -> None:
    pool = KVPool(NS, 6)
    fk, fv = pool.flat()
    assert fk.shape == (NS.num_layers * 6, NS.page_size, NS.num_kv_heads, NS.head_dim)
    assert fk.data_ptr() == pool.k.data_ptr() and fv.data_ptr() == pool.v.data_ptr()
    assert pool.flat_ids([4, 1]) == [4, 1, 10, 7, 16, 13]
    fk[pool.flat_ids([4])[2]].fill_(1.0)  # flat page of layer 2, page 4
    assert pool.k[2, 4].eq(1).all() and pool.k.sum() == pool.k[2, 4].numel()
