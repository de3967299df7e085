"""A receiving worker for page transfers (decode side), driven over stdin/stdout as JSON lines:
``python -m kvfuse.transfer._peer NUM_PAGES PAGE_SIZE NUM_KV_HEADS HEAD_DIM DTYPE``.

It registers a zeroed pool, prints its PoolDescriptor, then answers commands:
``{"op": "valid", "pages": [...]}`` (the sender's word that a transfer completed: only then
are pages marked valid), ``{"op": "digest", "pages": [...]}`` (blake2b of each valid page's
K and V bytes; invalid pages report null), ``{"op": "quit"}``.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from kvfuse.store._keys import DTYPES
from kvfuse.transfer._mooncake import MooncakeTransport


def page_digest(k_pages: torch.Tensor, v_pages: torch.Tensor, page: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(k_pages[page].contiguous().view(torch.uint8).numpy().tobytes())
    h.update(v_pages[page].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    num_pages, page_size, heads, head_dim = (int(x) for x in sys.argv[1:5])
    shape = (num_pages, page_size, heads, head_dim)
    k_pages = torch.zeros(shape, dtype=DTYPES[sys.argv[5]])
    v_pages = torch.zeros(shape, dtype=DTYPES[sys.argv[5]])
    transport = MooncakeTransport()
    print(json.dumps(transport.register_pool(k_pages, v_pages)), flush=True)
    valid: set[int] = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "valid":
            valid.update(cmd["pages"])
            print(json.dumps({"ok": True}), flush=True)
        elif cmd["op"] == "digest":
            out = [page_digest(k_pages, v_pages, p) if p in valid else None for p in cmd["pages"]]
            print(json.dumps({"digests": out}), flush=True)
    transport.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
