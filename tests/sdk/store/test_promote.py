"""Promotion layer by layer: exact bytes from the host and disk tiers into scattered pages,
a layer ready before the chunk is whole, and a corrupt layer that fails only what it must;
into a pool on the cpu and, where there is one, on a CUDA GPU (pinned host copies, copies
synchronised before a layer counts as moved, disk reads through pinned staging)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kvfuse import InvalidValueError, StoreError
from kvfuse.store import KVPool, Loading, Namespace, TieredStore, plan
from kvfuse.store import _promote as promote
from kvfuse.store._promote import Promotion
from storecases import corrupt_layer, same_bits

NS = Namespace(model_id="tiny", num_layers=4, num_kv_heads=2, head_dim=8, dtype="bf16", page_size=4)
POOLS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def _kv(seed: int, tokens: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = NS.chunk_shape(tokens)
    return torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(shape, generator=g).to(torch.bfloat16)


def _layer(store: TieredStore, pages: list[int], layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(pages, device=store.pool.device)
    return tuple(pool[layer][ids].flatten(0, 1)[:n].cpu() for pool in (store.pool.k, store.pool.v))  # type: ignore[return-value]


def _scattered_store(
    tmp_path: Path, tier: str, device: str = "cpu"
) -> tuple[TieredStore, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Chunks a, b (10 tokens) on ``tier``; the pool's free pages interleaved with pinned
    chunk c's, so a promoted chunk lands on runs of pages, not one block."""
    host = 1 << 20 if tier == "host" else 0
    store = TieredStore(NS, KVPool(NS, 12, device), host_bytes=host, disk_dir=tmp_path)
    kv = {key: _kv(i) for i, key in enumerate("abcd")}
    for key in "ab":
        store.put(key, *kv[key])
    store.put(
        "c",
        *kv["c"],
    )
    store.hold("c")
    store.put("d", *kv["d"])  # the pool is full: a goes down
    store.put("x", *_kv(9, 12))  # b goes down; x takes a's pages (3) and b's
    store.put("y", *_kv(8, 4))
    assert store.tier("a") == tier and store.tier("b") == tier
    return store, kv


@pytest.mark.parametrize("device", POOLS)
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_layerwise_promotion_moves_exact_bytes_into_any_pages(tmp_path: Path, tier: str, device: str) -> None:
    store, kv = _scattered_store(tmp_path, tier, device)
    assert store.host_layerwise == (device != "cpu")
    store.host_layerwise = True  # on the cpu the default moves host chunks whole
    loading = store.loading()
    with plan(store, [[1] * 10, [2] * 10], 0, keys=["a", "b"], loading=loading) as p:
        assert p.hits == [0, 1] and len(loading.promotions) == 2
        for layer in range(NS.num_layers):
            loading.wait(layer)
            for key, pages in zip("ab", p.pages):
                assert same_bits(_layer(store, pages, layer, 10), (kv[key][0][layer], kv[key][1][layer]))
        store.audit()
    assert store.tier("a") == "device" and store.stats.hits[tier] == 2
    assert store.stats.bytes_moved[f"{tier}->device"] == 2 * store._nbytes(10)


@pytest.mark.parametrize("device", POOLS)
def test_a_corrupt_layer_fails_that_layer_not_the_ones_before(
    tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(promote, "STEP_BYTES", 1)  # steps of layers 0, 1, 2-3 (this tiny chunk's would be 0, 1-3)
    store, kv = _scattered_store(tmp_path, "disk", device)
    corrupt_layer(tmp_path / "a.kv", 2)
    loading = store.loading()
    with plan(store, [[1] * 10], 0, keys=["a"], loading=loading) as p:
        for layer in (0, 1):
            loading.wait(layer)  # verified before they count as moved
            assert same_bits(_layer(store, p.pages[0], layer, 10), (kv["a"][0][layer], kv["a"][1][layer]))
        with pytest.raises(StoreError, match=r"chunk a \(layers 2-3\): payload checksum mismatch in layer 2"):
            loading.wait(2)
        try:  # layer 3 may have been moved (and verified) by the other mover meanwhile
            loading.wait(3)
            assert same_bits(_layer(store, p.pages[0], 3, 10), (kv["a"][0][3], kv["a"][1][3]))
        except StoreError as exc:
            assert "mismatch in layer 2" in str(exc)
        with pytest.raises(StoreError):
            loading.wait_all()
        assert store.tier("a") is None  # dropped: the next request recomputes it
        owners = store.audit()
        assert [v for k, v in owners.items() if k.startswith("failed:a")] == [p.pages[0]]  # still ours
    owners = store.audit()  # given back when the request let go
    assert not any(k.startswith("failed:") for k in owners) and set(p.pages[0]) <= set(owners["free"])
    assert store.stats.rejected == 1 and list((tmp_path / "quarantine").glob("a.kv.*"))
    assert store.fetch("a") is None  # a miss, not wrong KV
    # the chunk computed again is stored and served again
    store.put("a", *kv["a"])
    assert store.tier("a") == "device"


def test_host_chunks_move_whole_to_a_cpu_pool_all_of_a_request_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, kv = _scattered_store(tmp_path, "host")
    assert not store.host_layerwise
    writes: list[int] = []
    write_many = store.pool.write_many
    monkeypatch.setattr(
        store.pool, "write_many", lambda chunks, *a, **kw: (writes.append(len(chunks)), write_many(chunks, *a, **kw))
    )
    loading = store.loading()
    with plan(store, [[1] * 10, [2] * 10], 0, keys=["a", "b"], loading=loading) as p:
        assert len(loading.promotions) == 2 and not loading.pending  # moved whole as the plan started them
        assert writes == [2]
        for key, pages in zip("ab", p.pages):
            for layer in range(NS.num_layers):
                assert same_bits(_layer(store, pages, layer, 10), (kv[key][0][layer], kv[key][1][layer]))
    assert store.stats.hits["host"] == 2 and store.tier("a") == store.tier("b") == "device"


@pytest.mark.parametrize("device", POOLS)
def test_fetch_without_loading_waits_for_the_whole_chunk(tmp_path: Path, device: str) -> None:
    store, kv = _scattered_store(tmp_path, "disk", device)
    pages = store.fetch("b")
    assert pages is not None
    for layer in range(NS.num_layers):
        assert same_bits(_layer(store, pages, layer, 10), (kv["b"][0][layer], kv["b"][1][layer]))
    corrupt_layer(tmp_path / "a.kv", 3)
    assert store.fetch("a") is None and store.tier("a") is None  # checked to the last layer
    store.audit()


def test_a_loading_needs_a_holder(tmp_path: Path) -> None:
    store, _ = _scattered_store(tmp_path, "host")
    with pytest.raises(InvalidValueError, match="argument 'holder'"):
        store.fetch("a", loading=store.loading())
    assert store.tier("a") == "host"
    with pytest.raises(InvalidValueError, match=r"argument 'to'.*received remote"):
        store.demote("x", "remote")
    assert store.tier("x") == "device"
    no_disk = TieredStore(NS, KVPool(NS, 4), host_bytes=1 << 20)
    no_disk.put("x", *_kv(1, 8))
    with pytest.raises(InvalidValueError, match="argument 'to'"):
        no_disk.demote("x", "disk")
    assert no_disk.tier("x") == "device"


def test_discard_forgets_a_chunk_on_every_local_tier(tmp_path: Path) -> None:
    store, _ = _scattered_store(tmp_path, "disk")
    store.demote("d", "host")
    with pytest.raises(StoreError, match="pinned"):
        store.discard("c")  # held by the user
    free = store.pool.free_pages
    pages = store.fetch("x")
    assert pages is not None and store.discard("x") and store.pool.free_pages == free + len(pages)
    assert store.discard("a") and not (tmp_path / "a.kv").exists()  # the disk copy
    assert store.discard("d") and store.tier("d") is None  # the host copy
    assert not store.discard("a") and store.fetch("a") is None
    store.audit()


@pytest.mark.parametrize("layers", [1, 4, 30, 61])
@pytest.mark.parametrize("layer_bytes", [0, 1, 70_000, 800_000, 4 << 20])
def test_promotion_steps_cover_each_layer_once_layer_0_first_then_at_least_step_bytes(
    layers: int, layer_bytes: int
) -> None:
    steps = promote.promotion_steps(layers, layer_bytes)
    assert [i for r in steps for i in r] == list(range(layers)) and steps[0] == range(1)
    sizes = [len(r) for r in steps[1:]]
    for i, n in enumerate(sizes[:-1]):  # the last takes what is left
        assert n * layer_bytes >= promote.STEP_BYTES or n >= 2**i  # bytes, or 1, 2, 4, ... where bytes allow
        assert n == max(2**i, -(-promote.STEP_BYTES // layer_bytes) if layer_bytes else 1)


def _batched(moved: list[tuple[list[str], range]], fail: str | None = None) -> Any:
    """A batch mover that records each call's chunks and layers, failing any call holding ``fail``."""

    def mover(items: list[str], layers: range) -> None:
        moved.append((list(items), layers))
        if fail in items:
            raise OSError(f"copy of {fail} failed")

    return mover


def test_host_steps_of_one_range_move_as_one_call_per_mover_and_fail_only_their_chunks() -> None:
    from concurrent.futures import ThreadPoolExecutor

    moved: list[tuple[list[str], range]] = []
    mover = _batched(moved, fail="c2")
    steps = [range(0, 1), range(1, 4)]
    finished: list[str] = []
    with ThreadPoolExecutor(1) as movers:  # tasks run in the order queued
        loading = Loading(movers, parts=2)
        names = [f"c{i}" for i in range(6)]
        for name in names:
            loading.add(Promotion(name, steps, None, lambda n=name: finished.append(n), "host", batch=(mover, name)))
        loading.start()
        with pytest.raises(StoreError, match=r"chunk c0 \(layers 0-0\): copy of c2 failed"):
            loading.wait_all()
    # each range: one call per part (of three chunks); the call with c2 failed all three of
    # its chunks, whose later steps are skipped (no call); the other three moved on
    assert moved == [(["c0", "c1", "c2"], range(1)), (["c3", "c4", "c5"], range(1)), (["c3", "c4", "c5"], range(1, 4))]
    assert sorted(finished) == names
    for p in loading.promotions:
        assert (p.error is not None) == (p.key in ("c0", "c1", "c2"))
