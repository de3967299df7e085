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
        with store.pin(["c"]), pytest.raises(kvfuse.StoreError, match="the rest pinned"):
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


# -- request bookkeeping (issue 12): directed cases of what the state machine explores ----


def _store(pages: int = 10, **kw: object) -> TieredStore:
    return TieredStore(NS, KVPool(NS, pages), **kw)  # type: ignore[arg-type]


def _fill(store: TieredStore, p: kvfuse.store.Plan, i: int, seed: int) -> None:
    store.pool.write(p.pages[i], *chunk(seed))
    p.commit(i)


def test_two_requests_missing_one_chunk_never_see_other_kv() -> None:
    """Before: b's commit replaced a's entry, a's close unpinned it, pressure evicted it and
    b's pages were reused for another chunk (b read that chunk's KV, no error)."""
    store = _store(host_bytes=1 << 20)
    tokens = list(range(10))
    a, b = kvfuse.store.plan(store, [tokens], 0), kvfuse.store.plan(store, [tokens], 0)
    assert a.misses == [0] and b.misses == [0] and a.pages[0] != b.pages[0]
    for p in (a, b):
        store.pool.write(p.pages[0], *chunk(5))
    kept = a.commit(0)
    assert b.commit(0) == kept and b.pages[0] == kept  # b adopts the stored copy
    assert store.stats.duplicate_commits == 1
    a.close()
    pages = store.allocate(4 * 4)  # pressure: everything unpinned may go
    other = kvfuse.store.plan(store, [list(range(100, 110))], 0)
    _fill(store, other, 0, 9)
    assert store.tier(b.keys[0]) == "device" and same_bits(store.pool.read(b.pages[0], 10), chunk(5))
    store.audit()
    for p in (b, other):
        p.close()
    store.release(pages)
    owners = store.audit()
    assert owners["lent"] == [] and store.pins(b.keys[0]) == {}


def test_a_chunk_repeated_in_a_request_is_fetched_and_pinned_once() -> None:
    store = _store()
    doc = list(range(10))
    with kvfuse.store.plan(store, [doc, list(range(50, 55)), doc], 3) as p:
        assert p.misses == [0, 1] and p.pages[2] == p.pages[0]
        _fill(store, p, 0, 1)
        assert p.pages[2] == p.pages[0] and store.pins(p.keys[0]) == {p: 1}
    assert store.audit()["lent"] == [] and store.pins(p.keys[0]) == {}
    with kvfuse.store.plan(store, [doc, doc], 0) as q:
        assert q.hits == [0] and store.pins(q.keys[0]) == {q: 1}
    assert store.pins(q.keys[0]) == {}


def test_a_plan_that_fails_part_way_gives_everything_back() -> None:
    store = _store(pages=6, host_bytes=0)
    store.put("a", *chunk(1))
    store.hold("a")
    with pytest.raises(kvfuse.StoreError, match="pool full"):
        kvfuse.store.plan(store, [list(range(10))], live_tokens=4 * 4)  # 3 + 4 pages > 6 - 3
    owners = store.audit()
    assert owners["lent"] == [] and len(owners["free"]) == 3 and store.pins("a") == {"user": 1}


def test_aborting_a_request_whose_chunk_another_committed() -> None:
    store = _store()
    doc = list(range(10))
    a, b = kvfuse.store.plan(store, [doc], 2), kvfuse.store.plan(store, [doc], 2)
    _fill(store, a, 0, 3)
    b.abort()  # b never filled: its pages go back, a's pin and the stored copy stay
    assert store.pins(a.keys[0]) == {a: 1} and store.audit()["lent"] == sorted(a.lent())
    a.close()
    a.close()
    assert store.audit()["lent"] == [] and store.tier(a.keys[0]) == "device"


def test_a_failed_promotion_leaves_the_chunk_where_it_was() -> None:
    store = _store(pages=6)
    store.put("a", *chunk(1))
    store.put("b", *chunk(2))
    store.put("c", *chunk(3))  # a demoted to host memory
    assert store.tier("a") == "host"
    with store.pin(["b", "c"]), pytest.raises(kvfuse.StoreError, match="pool full"):
        store.fetch("a")
    assert store.tier("a") == "host" and store.stats.hits["host"] == 0
    pages = store.fetch("a")
    assert pages is not None and same_bits(store.pool.read(pages, 10), chunk(1))
    store.audit()


def test_release_and_unhold_of_what_is_not_held_change_nothing() -> None:
    store = _store()
    pages = store.allocate(8)
    store.put("a", *chunk(1))
    stored = store.audit()["a"]
    with pytest.raises(kvfuse.StoreError, match="not lent"):
        store.release(stored)  # a stored chunk's pages are not the caller's to free
    with pytest.raises(kvfuse.StoreError, match="not lent"):
        store.release([*pages, pages[0]])
    with pytest.raises(kvfuse.StoreError, match="holds no pin"):
        store.unhold("a")
    assert store.audit()["lent"] == sorted(pages) and store.audit()["a"] == stored
    store.release(pages)
    with pytest.raises(kvfuse.StoreError, match="not lent"):
        store.release(pages)  # twice
    assert store.audit()["lent"] == []


def test_malformed_puts_are_store_errors_and_change_nothing() -> None:
    store = _store()
    k, v = chunk(1)
    for args, match in (
        (("a", k.float().numpy(), v), "torch tensors"),
        (("a", k[0], v[0]), "num_layers, num_tokens"),
        (("a", k.float(), v.float()), "bf16"),
        (("../a", k, v), "chunk key"),
    ):
        with pytest.raises(kvfuse.StoreError, match=match):
            store.put(*args)  # type: ignore[arg-type]
    assert store.audit() == {"free": list(range(10)), "lent": []} and store.stats.puts == 0
