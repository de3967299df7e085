"""``kvfuse bench store``: promotion of stored chunks into the device pool against the
machine's limits, measured in the same run on the same bytes:

- host → device against warm memcpy into an existing buffer (``fraction_of_memcpy``);
- disk → device, page cache dropped for the chunk files (``posix_fadvise(DONTNEED)``,
  which needs no root), against a cold sequential read of the same files into an existing
  buffer (``fraction_of_cold_read``); and with the files in the page cache against a
  cached read (``fraction_of_cached_read``). Each layer's digest is checked in the time.

The pool lives on ``--device``'s torch device (default: the best available kvfuse device;
on a GPU, host copies are pinned and memcpy is the same bytes host → GPU, and every timed
run ends with the GPU synchronised). Each timed promotion is of every chunk (``fetch``);
between runs the chunks are sent back down (``demote``), untimed. ``/request``: the chunks
fetched as one request's (a ``Loading``), moved whole, all in one write when it starts.
``/layerwise``: the same request, moved layer by layer on the movers; ``first_layer_s``:
until layer 0 of every chunk is in the pool, when a request can start computing.

``--remote``: the remote tier's get path (Mooncake Store over TCP on 127.0.0.1 → checks →
device pool) against raw TCP between the same two processes (``fraction_of_tcp``): a
publisher process puts the chunks into the store, and sends the same bytes over a plain
socket into an existing buffer of this process; between runs the chunks are discarded
locally (``discard``), so every timed ``fetch`` is a remote hit.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GEOMETRY = {"layers": 30, "kv_heads": 3, "head_dim": 64, "page_size": 16}  # SmolLM2-135M's KV


def _timed(
    setup: Callable[[], object], fn: Callable[[], object], repeat: int, device: torch.device | None = None
) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs, ``setup`` (untimed) before each; on
    a GPU ``device``, until it has finished all that ``fn`` queued."""
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        setup()
        start = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _read_files(paths: list[Path], into: bytearray) -> None:
    """Sequential read of each file into one existing buffer (the disk's limit)."""
    view = memoryview(into)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            got = 0
            while n := f.readinto(view[got:]):
                got += n


def _workload(chunks: int, tokens: int, dtype: str) -> tuple[Any, list[str], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(namespace, keys, seeded KV of each chunk), the same in every process."""
    from kvfuse.store import Namespace

    ns = Namespace(
        model_id="bench-smollm2-shape",
        num_layers=GEOMETRY["layers"],
        num_kv_heads=GEOMETRY["kv_heads"],
        head_dim=GEOMETRY["head_dim"],
        dtype=dtype,
        page_size=GEOMETRY["page_size"],
    )
    g = torch.Generator().manual_seed(0)
    kv = [
        (
            torch.randn(ns.chunk_shape(tokens), generator=g).to(ns.torch_dtype),
            torch.randn(ns.chunk_shape(tokens), generator=g).to(ns.torch_dtype),
        )
        for _ in range(chunks)
    ]
    return ns, [f"bench-{i}" for i in range(chunks)], kv


def run_store(
    chunks: int, tokens: int, dtype: str, repeat: int, root: str | None = None, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Promotions into a pool on the torch ``device``."""
    from kvfuse.store import KVPool, TieredStore
    from kvfuse.store._direct import drop_cache

    dev = torch.device(device)
    ns, keys, kv = _workload(chunks, tokens, dtype)
    pages = chunks * -(-tokens // ns.page_size)
    nbytes = chunks * 2 * kv[0][0].numel() * kv[0][0].element_size()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=root, prefix="kvfuse-bench-store-") as tmp:
        store = TieredStore(ns, KVPool(ns, pages, dev), host_bytes=2 * nbytes, disk_dir=tmp, disk_bytes=4 * nbytes)
        for key, (k, v) in zip(keys, kv):
            store.put(key, k, v)
        files = [Path(tmp) / f"{key}.kv" for key in keys]

        def down(tier: str, cold: bool = False) -> Callable[[], None]:
            def go() -> None:
                for key in keys:
                    store.demote(key, tier)  # a chunk already there stays
                if cold:
                    drop_cache(files)

            return go

        def fetch_all() -> None:
            for key in keys:
                assert store.fetch(key) is not None, f"{key} missed"

        def layerwise() -> tuple[float, float]:
            """A request's promotion (``Loading``): seconds to layer 0 and to the whole."""
            loading = store.loading()
            start = time.perf_counter()
            for key in keys:
                store.fetch(key, holder="bench", loading=loading)
            loading.start()
            loading.wait(0)
            first = time.perf_counter() - start
            loading.wait_all()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            whole = time.perf_counter() - start
            for key in keys:
                store.unhold(key, "bench")
            return first, whole

        def layerwise_medians(setup: Callable[[], None]) -> tuple[float, float]:
            runs = []
            for _ in range(repeat):
                setup()
                runs.append(layerwise())
            return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

        pin = dev.type == "cuda"  # as the host tier's copies are
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
        dst = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        memcpy = _timed(lambda: None, lambda: dst.copy_(src, non_blocking=True), repeat, dev)
        host = _timed(down("host"), fetch_all, repeat, dev)
        default, store.host_layerwise = store.host_layerwise, False
        _, host_request = layerwise_medians(down("host"))  # one request's chunks, whole, in one write
        store.host_layerwise = True  # the mechanism, measured (the cpu moves them whole)
        host_first, host_layerwise = layerwise_medians(down("host"))
        store.host_layerwise = default
        for name, secs, first in (
            ("host->device", host, None),
            ("host->device/request", host_request, None),
            ("host->device/layerwise", host_layerwise, host_first),
        ):
            results.append(
                {
                    "case": f"{name}/{chunks}x{tokens}/{dtype}",
                    "bytes": nbytes,
                    "seconds": secs,
                    "gbps": nbytes / secs / 1e9,
                    "first_layer_s": first,
                    "baseline": "warm memcpy",
                    "baseline_seconds": memcpy,
                    "fraction_of_memcpy": memcpy / secs,
                }
            )
        down("disk")()
        dropped = drop_cache(files)
        buf = bytearray(sum(p.stat().st_size for p in files))
        cold_read = _timed(lambda: drop_cache(files), lambda: _read_files(files, buf), repeat)
        cold = _timed(down("disk", cold=True), fetch_all, repeat, dev)
        cold_first, cold_layerwise = layerwise_medians(down("disk", cold=True))
        cached_read = _timed(lambda: None, lambda: _read_files(files, buf), repeat)
        cached = _timed(down("disk"), fetch_all, repeat, dev)
        cold_case = ("cold sequential read", "fraction_of_cold_read")
        for name, secs, first, base, (base_name, field) in (
            ("disk->device/cold", cold, None, cold_read, cold_case),
            ("disk->device/cold/layerwise", cold_layerwise, cold_first, cold_read, cold_case),
            ("disk->device/cached", cached, None, cached_read, ("page-cache read", "fraction_of_cached_read")),
        ):
            results.append(
                {
                    "case": f"{name}/{chunks}x{tokens}/{dtype}",
                    "bytes": len(buf),
                    "seconds": secs,
                    "gbps": len(buf) / secs / 1e9,
                    "first_layer_s": first,
                    "baseline": base_name,
                    "baseline_seconds": base,
                    field: base / secs,
                    "cache_dropped": dropped if "cold" in name else None,
                    "baseline_gbps": len(buf) / base / 1e9,
                }
            )
        store.audit()
    return results


def run_remote(chunks: int, tokens: int, dtype: str, repeat: int) -> list[dict[str, Any]]:
    """The remote tier's get path against raw TCP between the same two processes."""
    from kvfuse._bench import worker
    from kvfuse.store import KVPool, LocalMaster, RemoteConfig, RemoteTier, TieredStore

    ns, keys, kv = _workload(chunks, tokens, dtype)
    with LocalMaster() as master:
        spec = {"master": master.config.master, "chunks": chunks, "tokens": tokens, "dtype": dtype}
        peer = worker("kvfuse._bench_store", json.dumps(spec))
        try:
            assert peer.stdout is not None
            ready = json.loads(peer.stdout.readline())  # the values are in the publisher's segment
            raw = socket.create_connection(("127.0.0.1", ready["tcp_port"]), timeout=60)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            remote = RemoteTier(RemoteConfig(master=master.config.master), ns)
            store = TieredStore(ns, KVPool(ns, chunks * -(-tokens // ns.page_size)), host_bytes=0, remote=remote)

            def forget() -> None:
                for key in keys:
                    store.discard(key)

            def get_all() -> None:
                for key in keys:
                    assert store.fetch(key) is not None, f"{key}: no remote hit"

            secs = _timed(forget, get_all, repeat)
            for key, (k, v) in zip(keys, kv):  # what arrived is what was published
                pages = store.fetch(key)
                assert pages is not None
                got = store.pool.read(pages, tokens)
                assert torch.equal(got[0], k) and torch.equal(got[1], v), f"{key} arrived different"
            buf = bytearray(ready["bytes"])
            tcp = _timed(lambda: None, lambda: _recv_all(raw, buf), repeat)
            raw.close()
            remote.close()
        finally:
            peer.kill()
            peer.wait()
    return [
        {
            "case": f"remote->device/{chunks}x{tokens}/{dtype}",
            "bytes": ready["bytes"],
            "seconds": secs,
            "gbps": ready["bytes"] / secs / 1e9,
            "first_layer_s": None,
            "baseline": "raw TCP",
            "baseline_seconds": tcp,
            "fraction_of_tcp": tcp / secs,
            "tcp_gbps": ready["bytes"] / tcp / 1e9,
        }
    ]


def _recv_all(sock: socket.socket, into: bytearray) -> None:
    """Ask the publisher for every value's bytes and receive them into ``into``."""
    sock.sendall(b"s")
    view, got = memoryview(into), 0
    while got < len(into):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the publisher closed the connection")
        got += n


def _publisher(spec: dict[str, Any]) -> int:
    """``python -m kvfuse._bench_store SPEC``: put the chunks into Mooncake Store (its own
    segment holds them), then send their encoded bytes over a socket on each request."""
    from kvfuse.store import RemoteConfig, RemoteTier
    from kvfuse.store._disk import encode

    ns, keys, kv = _workload(spec["chunks"], spec["tokens"], spec["dtype"])
    remote = RemoteTier(RemoteConfig(master=spec["master"], global_segment_bytes=1 << 30), ns)
    values = []
    for key, (k, v) in zip(keys, kv):
        if not remote.put(key, k, v):
            raise SystemExit(f"publishing {key} failed")
        values.append(encode(key, ns, k, v))
    server = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"tcp_port": server.getsockname()[1], "bytes": sum(map(len, values))}), flush=True)
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(1) == b"s":
        for value in values:
            conn.sendall(value)
    return 0


def _cmd(args: argparse.Namespace) -> int:
    if args.remote:
        rows = run_remote(args.chunks, args.tokens, args.dtype, args.repeat)
    else:
        from kvfuse._bench import _torch_device, best_device

        device = _torch_device(args.device or best_device())
        print(f"pool on {device}")
        rows = run_store(args.chunks, args.tokens, args.dtype, args.repeat, args.dir, str(device))
    for r in rows:
        frac = next(v for k, v in r.items() if k.startswith("fraction_of_"))
        first = f", layer 0 after {r['first_layer_s'] * 1e3:.1f} ms" if r["first_layer_s"] is not None else ""
        print(
            f"{r['case']:34} {r['seconds'] * 1e3:8.1f} ms {r['gbps']:6.2f} GB/s = {100 * frac:5.1f}% of "
            f"{r['baseline']} ({r['baseline_seconds'] * 1e3:.1f} ms){first}"
        )
        if r.get("cache_dropped") is False:
            print("  (the page cache could not be dropped here: the 'cold' rows are warm)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": rows}, f, indent=2)
    return 0


def register(parser: argparse.ArgumentParser, bench_sub: Any) -> None:
    p = bench_sub.add_parser("store", help="tier promotion vs warm memcpy and the disk's cold read")
    p.add_argument("--chunks", type=int, default=8, help="chunks promoted per run (default 8: 4k tokens)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per chunk")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", help="where the disk tier lives (default: the system's temporary directory)")
    p.add_argument(
        "--device", metavar="NAME", help="kvfuse device whose memory holds the pool (default: the best available)"
    )
    p.add_argument("--remote", action="store_true", help="the remote tier's get path against raw TCP instead")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_cmd)


if __name__ == "__main__":
    import sys

    raise SystemExit(_publisher(json.loads(sys.argv[1])))
