"""A receiving worker for page transfers (decode side), driven over stdin/stdout as JSON lines:
``python -m kvfuse.transfer._peer NUM_PAGES PAGE_SIZE NUM_KV_HEADS HEAD_DIM DTYPE [--transports=NAMES] [--tcp-sink]``.

It registers a zeroed pool with each transport of ``--transports`` (comma-separated
registry names; default ``mooncake``), prints one PoolDescriptor per line in that order,
then answers commands:
``{"op": "valid", "pages": [...]}`` (the sender's word that a transfer completed: only then
are pages marked valid), ``{"op": "digest", "pages": [...]}`` (blake2b of each valid page's
K and V bytes; invalid pages report null), ``{"op": "quit"}``.

With ``--tcp-sink`` it also listens on a plain TCP socket on 127.0.0.1 and
prints ``{"tcp_port": N}`` after the descriptor: the raw-TCP baseline of ``kvfuse bench
transfer`` between the same two processes. Each message is an 8-byte little-endian length
and that many bytes, received straight into the pool's memory (K's pages, then V's), and
acknowledged with one byte.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading

import kvfuse
import torch
from kvfuse.store._keys import DTYPES


def page_digest(k_pages: torch.Tensor, v_pages: torch.Tensor, page: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(k_pages[page].contiguous().view(torch.uint8).numpy().tobytes())
    h.update(v_pages[page].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tcp_sink(server: socket.socket, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dest = tuple(memoryview(p.view(-1).view(torch.uint8).numpy().data) for p in (k_pages, v_pages))
    with conn:
        while True:
            header = conn.recv(8, socket.MSG_WAITALL)
            if len(header) < 8:
                return
            n = int.from_bytes(header, "little")
            half = n // 2
            for view in dest:  # K's bytes, then V's
                got = 0
                while got < half:
                    step = conn.recv_into(view[got:half])
                    if step == 0:
                        return
                    got += step
            conn.sendall(b"\x01")


def main() -> int:
    num_pages, page_size, heads, head_dim = (int(x) for x in sys.argv[1:5])
    shape = (num_pages, page_size, heads, head_dim)
    k_pages = torch.zeros(shape, dtype=DTYPES[sys.argv[5]])
    v_pages = torch.zeros(shape, dtype=DTYPES[sys.argv[5]])
    flags = sys.argv[6:]
    names = next((f.partition("=")[2] for f in flags if f.startswith("--transports=")), "mooncake")
    transports = [kvfuse.registry().transport(name)() for name in names.split(",")]
    for transport in transports:
        print(json.dumps(transport.register_pool(k_pages, v_pages)), flush=True)
    if "--tcp-sink" in flags:
        server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=_tcp_sink, args=(server, k_pages, v_pages), daemon=True).start()
        print(json.dumps({"tcp_port": server.getsockname()[1]}), flush=True)
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
    for transport in transports:
        transport.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
