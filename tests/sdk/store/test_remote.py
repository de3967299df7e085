"""The remote tier against a real mooncake_master on 127.0.0.1 and real worker processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytestmark = pytest.mark.netns  # see the Makefile: run inside a private network namespace
pytest.importorskip("mooncake.store")

from kvfuse.store import KVPool, LocalMaster, RemoteTier, TieredStore
from kvfuse.store._disk import encode
from storecases import NS, chunk, same_bits

PUBLISHER = """
import sys, torch
from kvfuse.store import KVPool, Namespace, RemoteConfig, RemoteTier, TieredStore
ns = Namespace(**{ns})
remote = RemoteTier(RemoteConfig(master={master!r}, metadata={metadata!r}), ns)
store = TieredStore(ns, KVPool(ns, 16), host_bytes=0, remote=remote)
for i in range(3):
    g = torch.Generator().manual_seed(i)
    s = ns.chunk_shape(10)
    k, v = (torch.randn(s, generator=g).to(torch.bfloat16) for _ in range(2))
    store.put(f"chunk{{i}}", k, v)
print("published", store.stats.bytes_moved["device->remote"], flush=True)
sys.stdin.readline()  # keep this process (and the memory it lends to the pool) alive until told
"""


@pytest.fixture
def master() -> LocalMaster:
    with LocalMaster() as m:
        yield m


def _publisher(master: LocalMaster) -> subprocess.Popen[str]:
    code = PUBLISHER.format(ns=NS.model_dump(), master=master.config.master, metadata=master.config.metadata)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("published") and int(line.split()[1]) > 0, proc.stderr.read() if proc.stderr else ""
    return proc


def test_round_trip_between_processes_is_bit_exact(master: LocalMaster) -> None:
    publisher = _publisher(master)
    try:
        store = TieredStore(NS, KVPool(NS, 16), host_bytes=0, remote=RemoteTier(master.config, NS))
        for i in range(3):
            pages = store.fetch(f"chunk{i}")
            assert pages is not None and same_bits(store.pool.read(pages, 10), chunk(i))
        assert store.stats.hits["remote"] == 3 and store.stats.misses == 0
        assert store.fetch("never-stored") is None and store.stats.misses == 1
        assert store.stats.remote_failures == 0  # an absent key is a miss, not a failed lookup
    finally:
        publisher.communicate("\n", timeout=30)


def test_master_gone_degrades_to_local_tiers(master: LocalMaster) -> None:
    store = TieredStore(NS, KVPool(NS, 16), host_bytes=0, remote=RemoteTier(master.config, NS))
    store.put("local", *chunk(5))
    master.stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.fetch("elsewhere") is None  # a miss, not an error
        store.put("after", *chunk(6))  # publishing fails quietly
    assert store.stats.remote_failures >= 1
    assert any("serving from the local tiers" in str(w.message) for w in caught)
    for key, seed in (("local", 5), ("after", 6)):  # local tiers intact, right KV
        pages = store.fetch(key)
        assert pages is not None and same_bits(store.pool.read(pages, 10), chunk(seed))


def _damaged(damage: str) -> bytes:
    data = bytearray(encode("bad", NS, *chunk(7)))
    if damage == "flipped-payload-bit":
        data[-3] ^= 0x10
    elif damage == "too-short":
        data = data[:5]
    elif damage == "bad-header":
        data[20] ^= 0x01
    elif damage == "payload-short":  # a valid header whose payload is cut
        data = data[:-100]
    elif damage == "other-key":
        data = bytearray(encode("other", NS, *chunk(7)))
    elif damage == "forged":  # plain bytes where the store expects a MAC
        pass
    return bytes(data)


@pytest.mark.parametrize(
    "damage", ["flipped-payload-bit", "too-short", "bad-header", "payload-short", "other-key", "forged"]
)
def test_malformed_remote_values_are_counted_misses(
    master: LocalMaster, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = RemoteTier(master.config, NS)
    data = bytearray(_damaged(damage))
    buf = torch.frombuffer(data, dtype=torch.uint8)
    assert remote.client.register_buffer(buf.data_ptr(), len(data)) == 0
    assert remote.client.put_from("bad", buf.data_ptr(), len(data)) == 0
    kw = {}
    if damage == "forged":
        monkeypatch.setenv("KVFUSE_REMOTE_MAC", "33" * 32)
        kw = {"mac_key_env": "KVFUSE_REMOTE_MAC"}
    store = TieredStore(NS, KVPool(NS, 16), host_bytes=0, remote=remote, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert store.fetch("bad") is None
    assert store.stats.remote_corrupt == 1 and store.stats.misses == 1
    store.audit()


def test_a_dead_master_fails_setup_within_the_timeout() -> None:
    import time

    from kvfuse import StoreError
    from kvfuse.store import RemoteConfig
    from kvfuse.store._remote import _free_port

    start = time.monotonic()
    with pytest.raises(StoreError, match="not reachable"):
        RemoteTier(RemoteConfig(master=f"127.0.0.1:{_free_port()}", connect_timeout_s=2.0), NS)
    assert time.monotonic() - start < 5  # Mooncake's own setup takes ~90 s to give up


def test_lookups_against_a_dead_master_do_not_stall(master: LocalMaster) -> None:
    import time

    store = TieredStore(NS, KVPool(NS, 16), host_bytes=0, remote=RemoteTier(master.config, NS))
    master.stop()
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(20):
            assert store.fetch(f"k{i}") is None
    assert time.monotonic() - start < 5 and store.stats.misses == 20
