"""The tiered store: keys, tiers and LRU demotion, pins, the disk format, restarts, and two
real processes sharing one directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kvfuse
import pytest
from kvfuse.store import KVPool, TieredStore, chunk_key
from storecases import NS, chunk, same_bits


def test_keys_are_stable_digests_of_layout_and_tokens() -> None:
    key = chunk_key(NS, [1, 2, 3])
    code = (
        "from kvfuse.store import Namespace, chunk_key; import sys; "
        f"print(chunk_key(Namespace(**{NS.model_dump()!r}), [1, 2, 3]))"
    )
    for seed in ("1", "2"):  # never Python's hash: the same key in any process
        env = {**os.environ, "PYTHONHASHSEED": seed}
        assert (
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
            ).stdout.strip()
            == key
        )
    assert chunk_key(NS, [1, 2, 4]) != key
    assert chunk_key(NS.model_copy(update={"dtype": "fp16"}), [1, 2, 3]) != key
    assert chunk_key(NS.model_copy(update={"rope": '{"theta": 500000.0}'}), [1, 2, 3]) != key


def test_put_fetch_round_trip_through_every_tier(tmp_path: Path) -> None:
    pool = KVPool(NS, num_pages=6)  # room for two 10-token chunks (3 pages each)
    store = TieredStore(NS, pool, host_bytes=2 * 2 * 2 * 10 * 2 * 8 * 2, disk_dir=tmp_path, disk_bytes=1 << 20)
    chunks = {f"c{i}": chunk(i) for i in range(6)}
    for key, (k, v) in chunks.items():
        store.put(key, k, v)
    # c4, c5 on the device; c2, c3 in host memory (2 chunks fit); c0, c1 demoted to disk
    assert [store.tier(f"c{i}") for i in range(6)] == ["disk", "disk", "host", "host", "device", "device"]
    assert store.stats.demotions["device->host"] == 4 and store.stats.demotions["host->disk"] == 2
    for key in ("c5", "c3", "c0"):
        pages = store.fetch(key)
        assert pages is not None and same_bits(pool.read(pages, 10), chunks[key])
    assert store.stats.hits == {"device": 1, "host": 1, "disk": 1, "remote": 0}
    assert store.fetch("nope") is None and store.stats.misses == 1


def test_pinned_chunks_are_never_evicted(tmp_path: Path) -> None:
    pool = KVPool(NS, num_pages=6)
    store = TieredStore(NS, pool, host_bytes=0, disk_dir=tmp_path)
    store.put("a", *chunk(1))
    store.put("b", *chunk(2))
    with store.pin(["a"]):
        store.put("c", *chunk(3))  # must evict b, not a
        assert store.tier("a") == "device" and store.tier("b") == "disk"
        with store.pin(["c"]), pytest.raises(kvfuse.StoreError, match="all pinned"):
            store.put("d", *chunk(4))
    store.put("d", *chunk(4))  # unpinned again: a can go
    assert store.tier("a") == "disk"


def test_restart_rebuilds_the_index_from_disk(tmp_path: Path) -> None:
    store = TieredStore(NS, KVPool(NS, 3), host_bytes=0, disk_dir=tmp_path)
    for i in range(3):
        store.put(f"k{i}", *chunk(i))
    fresh = TieredStore(NS, KVPool(NS, 3), host_bytes=0, disk_dir=tmp_path)
    assert fresh.tier("k0") == "disk" and fresh.tier("k1") == "disk"
    pages = fresh.fetch("k1")
    assert pages is not None and same_bits(fresh.pool.read(pages, 10), chunk(1))


@pytest.mark.parametrize("damage", ["flip-payload", "truncate", "flip-header", "other-namespace"])
def test_damaged_files_are_misses_and_quarantined(tmp_path: Path, damage: str) -> None:
    store = TieredStore(NS, KVPool(NS, 3), host_bytes=0, disk_dir=tmp_path)
    store.put("x", *chunk(7))
    store.put("y", *chunk(8))  # x demoted to disk
    path = tmp_path / "x.kv"
    data = bytearray(path.read_bytes())
    if damage == "flip-payload":
        data[-5] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 17]
    elif damage == "flip-header":
        data[20] ^= 0x01
    path.write_bytes(bytes(data))
    ns = NS.model_copy(update={"head_dim": 4, "num_kv_heads": 4}) if damage == "other-namespace" else NS
    reader = TieredStore(ns, KVPool(ns, 3), host_bytes=0, disk_dir=tmp_path)
    assert reader.fetch("x") is None
    assert not path.exists() and list((tmp_path / "quarantine").iterdir())


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        from kvfuse.store import KVPool, Namespace, TieredStore
        ns = Namespace(**{NS.model_dump()!r})
        me = int(sys.argv[1])
        store = TieredStore(ns, KVPool(ns, 6), host_bytes=0, disk_dir={str(tmp_path)!r})
        def chunk(i):
            g = torch.Generator().manual_seed(i)
            s = ns.chunk_shape(10)
            return torch.randn(s, generator=g).to(torch.bfloat16), torch.randn(s, generator=g).to(torch.bfloat16)
        for round in range(3):
            for i in range(12):  # both write keys 4..7; each writes 4 of its own
                key = i if 4 <= i < 8 else i + 100 * me
                store.put(f"c{{key}}", *chunk(key))
        bad = 0
        for i in list(range(12)) + [i + 100 * (1 - me) for i in range(12)]:
            pages = store.fetch(f"c{{i}}")
            if pages is not None:
                got = store.pool.read(pages, 10)
                bad += not all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, chunk(i)))
        print(bad, store.disk.quarantined)
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(me)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for me in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["0", "0"]  # no wrong KV, nothing corrupt
    assert not list(tmp_path.glob(".*.tmp"))  # no partial files left visible
    assert len(list(tmp_path.glob("*.kv"))) >= 16
