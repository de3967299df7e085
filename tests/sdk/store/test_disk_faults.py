"""Disk tier faults: real OS errors (a file-size limit, a full and a read-only filesystem),
writers killed mid-write, entries that are not regular files, headers whose checksums
are valid but whose fields are not, and forged entries in the authenticated mode. Each is
a StoreError or a miss; the store stays usable and never returns wrong KV."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import kvfuse
import pytest
from kvfuse.store import KVPool, TieredStore
from kvfuse.store._disk import MAGIC
from storecases import NS, chunk, disk_full, same_bits


def _disk_store(root: Path, **kw: object) -> TieredStore:
    """Pool of 3 pages (one 10-token chunk), no host tier: a second put goes to disk."""
    return TieredStore(NS, KVPool(NS, 3), host_bytes=0, disk_dir=root, **kw)  # type: ignore[arg-type]


def test_a_write_the_os_refuses_is_a_store_error_and_keeps_the_chunk(tmp_path: Path) -> None:
    store = _disk_store(tmp_path)
    store.put("a", *chunk(1))
    with disk_full(True):
        with pytest.warns(RuntimeWarning, match="writing chunk a .* kept in host memory"):
            store.put("b", *chunk(2))  # a goes to host memory; the OS refuses its file
        assert store.tier("a") == "host" and store.tier("b") == "device"
        with pytest.raises(kvfuse.StoreError, match="writing chunk a") as info:
            store.put("c", *chunk(3))  # room for c needs a on disk: refused again
    assert isinstance(info.value.__cause__, OSError)
    assert store.tier("a") == "host" and store.tier("b") == "device" and store.tier("c") is None
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.kv"))
    assert store.stats.disk_errors == 2
    store.audit()
    pages = store.fetch("b")  # still served
    assert pages is not None and same_bits(store.pool.read(pages, 10), chunk(2))
    store.put("c", *chunk(3))  # the disk works again: everything proceeds
    assert store.tier("a") == "disk" and store.tier("b") == "disk"
    pages = store.fetch("a")
    assert pages is not None and same_bits(store.pool.read(pages, 10), chunk(1))


def _unshare_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "mkdir -p /tmp/.kvfuse-probe && mount -t tmpfs -o size=64k tmpfs /tmp/.kvfuse-probe"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


FS_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    sys.path.insert(0, {tests!r})
    import kvfuse
    from kvfuse.store import KVPool, TieredStore
    from storecases import NS, chunk, same_bits
    root = {root!r}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size={size}", "tmpfs", root], check=True)
    store = TieredStore(NS, KVPool(NS, 3), host_bytes=0, disk_dir=root)
    fault = sys.argv[1]
    if fault == "read-only":
        store.put("a", *chunk(1)); store.put("b", *chunk(2))  # a on disk
        subprocess.run(["mount", "-o", "remount,ro", root], check=True)
    else:
        open(os.path.join(root, "filler"), "wb").write(b"x" * {filler})
    try:
        for i in range(3, 9):
            store.put(f"c{{i}}", *chunk(i))
    except kvfuse.StoreError as exc:
        print("error", type(exc.__cause__).__name__, exc.__cause__.errno)
    store.audit()
    tmp = [n for n in os.listdir(root) if n.endswith(".tmp")]
    held = [f"c{{i}}" for i in range(3, 9) if store.tier(f"c{{i}}") == "device"]
    ok = all(same_bits(store.pool.read(store.fetch(k), 10), chunk(int(k[1:]))) for k in held)
    print("tmp", len(tmp), "held", len(held), "ok", ok)
    if fault == "read-only":
        try:  # readable from the read-only disk when it needs no room; else a typed error
            pages = store.fetch("a")
            print("a", pages is not None and same_bits(store.pool.read(pages, 10), chunk(1)))
        except kvfuse.StoreError:
            print("a", "StoreError")
""")


@pytest.mark.skipif(not _unshare_mount(), reason="needs a private mount namespace (root, unshare -m)")
@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_full_and_read_only_filesystems(tmp_path: Path, fault: str) -> None:
    """A real tmpfs, mounted in a private mount namespace: ENOSPC when full, EROFS when
    remounted read-only. The store raises StoreError from the OSError, leaves no partial
    file, keeps every chunk it had and answers reads."""
    root = tmp_path / "fs"
    root.mkdir()
    script = FS_SCRIPT.format(
        tests=str(Path(__file__).parents[2]), root=str(root), size=256 << 10, filler=(256 << 10) - 4096
    )
    out = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", script, fault], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    code = {"disk-full": "28", "read-only": "30"}[fault]  # ENOSPC, EROFS
    assert lines["error"].endswith(code), lines
    assert lines["tmp"].startswith("0 ") and lines["tmp"].endswith("ok True"), lines
    if fault == "read-only":
        assert lines["a"] in ("True", "StoreError")


def test_temporaries_of_a_killed_writer_are_removed_at_the_next_start(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".abc.{dead.pid}.{'0' * 32}.tmp"
    stale.write_bytes(b"half a chunk")
    live = tmp_path / f".abc.{os.getppid()}.{'1' * 32}.tmp"  # a writer that is alive
    live.write_bytes(b"being written")
    _disk_store(tmp_path)
    assert not stale.exists() and live.exists()


def test_entries_that_are_not_regular_files_are_quarantined_without_blocking(tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside.kv"
    writer = _disk_store(tmp_path)
    writer.put("good", *chunk(1))
    writer.put("other", *chunk(2))  # good on disk
    shutil.copy(tmp_path / "good.kv", outside)
    (tmp_path / "dir.kv").mkdir()
    os.mkfifo(tmp_path / "fifo.kv")  # a blocking open for reading would hang forever
    os.symlink("/dev/zero", tmp_path / "zero.kv")
    os.symlink(outside, tmp_path / "link.kv")  # valid bytes, but outside the store
    start = time.monotonic()
    store = _disk_store(tmp_path)
    for key in ("dir", "fifo", "zero", "link"):
        assert store.fetch(key) is None
        assert not os.path.lexists(tmp_path / f"{key}.kv")
    assert time.monotonic() - start < 10
    assert store.tier("good") == "disk" and store.disk is not None and store.disk.quarantined == 4
    pages = store.fetch("good")
    assert pages is not None and same_bits(store.pool.read(pages, 10), chunk(1))
    store.put("dir", *chunk(3))  # the name is free again
    assert store.tier("dir") == "device"


def _forge(path: Path, edit: object) -> None:
    """Rewrite the header of a chunk file with ``edit`` applied, with a valid digest."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[8:16])
    meta = json.loads(data[16 : 16 + length])
    payload = data[16 + length + 32 :]
    if callable(edit):
        result = edit(meta, payload)
        payload = result if isinstance(result, bytes) else payload
    header = json.dumps(meta).encode()
    digest = hashlib.blake2b(header, digest_size=32).digest()
    path.write_bytes(MAGIC + struct.pack("<Q", len(header)) + header + digest + payload)


def _set(field: str, value: object):  # type: ignore[no-untyped-def]
    return lambda meta, payload: meta.__setitem__(field, value)


def _drop(field: str):  # type: ignore[no-untyped-def]
    return lambda meta, payload: meta.pop(field)


EDITS = {
    "shape-strings": _set("shape", ["2", "10", "2", "8"]),
    "shape-three": _set("shape", [2, 10, 16]),
    "shape-negative": _set("shape", [2, -10, 2, 8]),
    "payload-bytes-float": _set("payload_bytes", 640.0),
    "payload-bytes-huge": _set("payload_bytes", 1 << 40),
    "dtype-unknown": _set("dtype", "fp8"),
    "dtype-other": _set("dtype", "fp16"),
    "key-int": _set("key", 7),
    "missing-hash": _drop("layer_digests"),
    "hashes-one-short": lambda meta, payload: meta.__setitem__("layer_digests", meta["layer_digests"][:-1]),
    "hash-not-hex": lambda meta, payload: meta.__setitem__("layer_digests", ["zz" * 4] * 2),
    "hash-other-kind": _set("layer_check", "sha256"),
    "hash-wrong-width": lambda meta, payload: meta.__setitem__("layer_digests", ["ab" * 32] * 2),
    "missing-shape": _drop("shape"),
    "extra-field": _set("pickle", "cos\nsystem\n"),
    "auth-keyed": _set("auth", "blake2b-keyed"),
    "payload-short": lambda meta, payload: payload[:-64],
    "payload-long": lambda meta, payload: payload + bytes(64),
    "shape-vs-payload": _set("shape", [2, 9, 2, 8]),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_inconsistent_headers_with_valid_digests_are_misses(tmp_path: Path, edit: str) -> None:
    writer = _disk_store(tmp_path)
    writer.put("x", *chunk(7))
    writer.put("y", *chunk(8))  # x to disk
    writer.put("z", *chunk(9))  # y to disk
    _forge(tmp_path / "x.kv", EDITS[edit])
    reader = _disk_store(tmp_path)  # opening never fails
    assert reader.tier("x") is None or reader.fetch("x") is None
    assert not (tmp_path / "x.kv").exists() and reader.disk is not None and reader.disk.quarantined == 1
    assert reader.stats.rejected + reader.disk.rejected >= 1
    pages = reader.fetch("y")
    assert pages is not None and same_bits(reader.pool.read(pages, 10), chunk(8))


def test_keys_that_are_not_file_names_are_refused(tmp_path: Path) -> None:
    store = _disk_store(tmp_path)
    for key in ("../evil", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(kvfuse.StoreError, match="chunk key"):
            store.disk.path(key)  # type: ignore[union-attr]
        assert store.fetch(key) is None


# -- authenticated mode ------------------------------------------------------------------


def test_forged_entries_are_misses_with_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFUSE_TEST_MAC", "11" * 32)
    monkeypatch.setenv("KVFUSE_OTHER_MAC", "22" * 32)
    owner = _disk_store(tmp_path, mac_key_env="KVFUSE_TEST_MAC")
    owner.put("real", *chunk(1))
    owner.put("tmp", *chunk(2))  # real to disk, with a MAC
    # an attacker who can write the directory but lacks the key: plain entries, or keyed
    # with a key of their own, carrying other KV under a key the victim will ask for
    attacker = _disk_store(tmp_path / "plain")
    attacker.put("evil1", *chunk(66))
    attacker.put("x1", *chunk(67))
    shutil.copy(tmp_path / "plain" / "evil1.kv", tmp_path / "evil1.kv")
    other = _disk_store(tmp_path / "keyed", mac_key_env="KVFUSE_OTHER_MAC")
    other.put("evil2", *chunk(66))
    other.put("x2", *chunk(67))
    shutil.copy(tmp_path / "keyed" / "evil2.kv", tmp_path / "evil2.kv")
    victim = _disk_store(tmp_path, mac_key_env="KVFUSE_TEST_MAC")
    assert victim.fetch("evil1") is None and victim.fetch("evil2") is None
    assert victim.stats.rejected + victim.disk.rejected == 2  # type: ignore[union-attr]
    pages = victim.fetch("real")
    assert pages is not None and same_bits(victim.pool.read(pages, 10), chunk(1))
    # without the key the authenticated entry cannot be checked: a miss, not trusted
    assert _disk_store(tmp_path).fetch("real") is None


def test_payload_edits_under_a_valid_mac_are_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a key, each layer's SHA-256 sits in the MAC'd header: a payload edit cannot
    keep it (a CRC-32 could be kept by choosing the edit)."""
    monkeypatch.setenv("KVFUSE_TEST_MAC", "11" * 32)
    store = _disk_store(tmp_path, mac_key_env="KVFUSE_TEST_MAC")
    store.put("real", *chunk(1))
    store.put("tmp", *chunk(2))  # real to disk
    data = bytearray((tmp_path / "real.kv").read_bytes())
    (length,) = struct.unpack("<Q", data[8:16])
    meta = json.loads(data[16 : 16 + length])
    assert meta["layer_check"] == "sha256" and all(len(d) == 64 for d in meta["layer_digests"])
    data[-3] ^= 0x01  # the last layer's V
    (tmp_path / "real.kv").write_bytes(bytes(data))
    assert store.fetch("real") is None and store.stats.rejected == 1


def test_mac_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))
    store = _disk_store(tmp_path / "a", mac_key_file=keyfile)
    assert store.mac_key == keyfile.read_bytes()
    for kw, match in (
        ({"mac_key_env": "KVFUSE_UNSET_KEY"}, "is not set"),
        ({"mac_key_file": tmp_path / "none"}, "cannot read"),
    ):
        with pytest.raises(kvfuse.StoreError, match=match):
            _disk_store(tmp_path / "b", **kw)
    monkeypatch.setenv("KVFUSE_SHORT", "ab" * 4)
    with pytest.raises(kvfuse.StoreError, match="16 to 64 bytes"):
        _disk_store(tmp_path / "c", mac_key_env="KVFUSE_SHORT")


@pytest.mark.parametrize("layer", [0, 5, 7])
def test_a_value_checked_in_shares_is_rejected_for_a_bad_byte_in_any_layer(layer: int) -> None:
    """A value large enough that its layers are checked in shares on several threads
    (the remote tier's get): a flipped bit in any layer's K or V is a ChunkRejected naming
    that layer; the untouched value decodes bit-exact."""
    import torch
    from kvfuse.store import Namespace
    from kvfuse.store._disk import _CHECK_PART, ChunkRejected, decode, encode

    ns = Namespace(model_id="big", num_layers=8, num_kv_heads=4, head_dim=64, dtype="fp32", page_size=16)
    g = torch.Generator().manual_seed(layer)
    k, v = torch.randn(2, *ns.chunk_shape(1024), generator=g)
    value = bytearray(encode("big-chunk", ns, k, v))
    assert 2 * k.numel() * 4 >= 2 * _CHECK_PART  # at least two shares
    got = decode(value, "big-chunk", ns, copy=False)
    assert same_bits(got, (k, v))
    for half in (0, 1):  # K, then V
        bad = bytearray(value)
        layer_bytes = k[0].numel() * 4
        at = len(bad) - 2 * k.numel() * 4 + (2 * layer + half) * layer_bytes + layer_bytes // 2
        bad[at] ^= 0x10
        with pytest.raises(ChunkRejected, match=f"layer {layer}$"):
            decode(bad, "big-chunk", ns, copy=False)
