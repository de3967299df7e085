"""``kvfuse bench transfer``: GB/s of page transfer between two processes on 127.0.0.1, by
each transport (``mooncake``: Mooncake Transfer Engine over TCP; ``tcp``: kvfuse's
two-sided TCP transport), against raw TCP over loopback between the same two processes
(the same bytes sent with ``sendall`` and received straight into the peer's pool: the
limit, ``fraction_of_tcp``), the same bytes sent by the same transport as pages
consecutive on both sides (``contiguous_gbps``: for Mooncake one slice for K and one for
V, the transport's own limit whatever the page layout), and a local ``torch.clone`` of
the same bytes (timed apart: its fresh pages' faults disturb whatever runs next)."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import socket
import subprocess
import sys
from typing import Any

import torch
from kvfuse._bench import medians

PAGE_SIZE, HEADS, HEAD_DIM = 16, 8, 128
LAYOUTS = ("scattered", "runs", "scattered-to-runs")


def _clone(k: torch.Tensor, v: torch.Tensor) -> object:
    return k.clone(), v.clone()


def _raw_tcp(sock: socket.socket, k: torch.Tensor, v: torch.Tensor) -> None:
    """Send ``k`` and ``v``'s bytes as one message and wait for the peer's acknowledgement."""
    a, b = (memoryview(t.contiguous().view(-1).view(torch.uint8).numpy().data) for t in (k, v))
    sock.sendall((len(a) + len(b)).to_bytes(8, "little"))
    sock.sendall(a)
    sock.sendall(b)
    if sock.recv(1) != b"\x01":
        raise ConnectionError("the raw-TCP peer did not acknowledge")


def _runs(n: int, top: int, run: int, seed: int) -> list[int]:
    """``n`` page ids of ``top`` in shuffled runs of ``run`` consecutive pages."""
    run = min(run, top)
    g = torch.Generator().manual_seed(seed)
    starts = (torch.randperm(top // run, generator=g) * run).tolist()
    return [s + j for s in starts for j in range(run)][:n]


def available_transports() -> list[str]:
    """The transports this machine can run: Mooncake where its wheel imports, and tcp."""
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        return ["tcp"]
    return ["mooncake", "tcp"]


def run_transfer(
    counts: list[int], repeat: int = 5, dtype: str = "bf16", transports: list[str] | None = None
) -> list[dict[str, Any]]:
    import kvfuse
    from kvfuse.store._keys import DTYPES

    names = transports or available_transports()
    top = 2 * max(counts)  # pools twice the largest send: its scattered pages are not a permutation of all
    peer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvfuse.transfer._peer",
            str(top),
            str(PAGE_SIZE),
            str(HEADS),
            str(HEAD_DIM),
            dtype,
            f"--transports={','.join(names)}",
            "--tcp-sink",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    senders = {name: kvfuse.registry().transport(name)() for name in names}
    try:
        assert peer.stdout is not None
        descs = {name: json.loads(peer.stdout.readline()) for name in names}
        port = json.loads(peer.stdout.readline())["tcp_port"]
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kv = torch.randn(2, top, PAGE_SIZE, HEADS, HEAD_DIM).to(DTYPES[dtype])
        k, v = kv[0].contiguous(), kv[1].contiguous()
        for sender in senders.values():
            sender.register_pool(k, v)
        rows = []
        for n, layout, name in itertools.product(counts, LAYOUTS, names):
            if layout == "scattered":  # pages anywhere on both sides: one slice per page
                ids, dst = torch.randperm(top)[:n].tolist(), torch.randperm(top)[:n].tolist()
            elif layout == "runs":  # chunks of 32 pages, consecutive on both sides as a pool lends them
                ids, dst = _runs(n, top, 32, 0), _runs(n, top, 32, 1)
            else:  # pages anywhere here, into runs of 32 there: gathered into the stage, a slice per run
                ids, dst = torch.randperm(top)[:n].tolist(), _runs(n, top, 32, 1)
            src_k, src_v = k[:n], v[:n]  # the same bytes, contiguous, for the local baseline

            def send(i: list[int], d: list[int], name: str = name) -> None:
                senders[name].send_pages(k, v, i, descs[name], d).wait()

            secs, whole, tcp = medians(
                [
                    functools.partial(send, ids, dst),
                    functools.partial(send, list(range(n)), list(range(n))),  # Mooncake: one slice each for K and V
                    functools.partial(_raw_tcp, raw, src_k, src_v),
                ],
                repeat,
                torch.device("cpu"),
            )
            # apart: its fresh pages' faults and their unmapping would slow whatever ran next
            (base,) = medians([functools.partial(_clone, src_k, src_v)], repeat, torch.device("cpu"))
            nbytes = 2 * n * k[0].numel() * k.element_size()
            rows.append(
                {
                    "transport": name,
                    "pages": n,
                    "layout": layout,
                    "bytes": nbytes,
                    "seconds": secs,
                    "tcp_seconds": tcp,
                    "clone_seconds": base,
                    "gbps": nbytes / secs / 1e9,
                    "tcp_gbps": nbytes / tcp / 1e9,
                    "clone_gbps": nbytes / base / 1e9,
                    "fraction_of_tcp": tcp / secs,
                    "contiguous_gbps": nbytes / whole / 1e9,
                    "fraction_of_contiguous": whole / secs,
                    "fraction_of_clone": base / secs,
                }
            )
        raw.close()
        return rows
    finally:
        for sender in senders.values():
            sender.close()
        peer.kill()
        peer.wait()


def _cmd(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.pages.split(",")]
    transports = args.transports.split(",") if args.transports else None
    rows = run_transfer(counts, repeat=args.repeat, transports=transports)
    print(f"page = {PAGE_SIZE} tokens x {HEADS} kv heads x {HEAD_DIM} dims, bf16, K and V; over TCP on 127.0.0.1")
    for r in rows:
        print(
            f"  {r['transport']:8} {r['pages']:5d} pages {r['layout']:17} {r['bytes'] / 2**20:8.2f} MiB "
            f"{r['seconds'] * 1e3:8.3f} ms {r['gbps']:6.2f} GB/s  raw TCP {r['tcp_gbps']:5.2f} GB/s "
            f"{100 * r['fraction_of_tcp']:5.1f} % of TCP  contiguous {r['contiguous_gbps']:5.2f} GB/s  "
            f"clone {r['clone_gbps']:6.2f} GB/s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": rows, "threads": torch.get_num_threads()}, f, indent=2)
    return 0


def register(parser: argparse.ArgumentParser, bench_sub: Any) -> None:
    p = bench_sub.add_parser("transfer", help="page transfer between two processes vs raw TCP and torch.clone")
    p.add_argument("--pages", default="1,16,256,4096", help="comma-separated page counts")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--transports", metavar="NAMES", help="comma-separated, of mooncake and tcp (default: those that run here)"
    )
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_cmd)
