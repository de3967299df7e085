"""While a request's chunks move into a cpu pool, the forward runs on the cores the movers
leave, and gets every core back at the first layer after the last promotion, or when
the request ends, however it ends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from kvfuse import StoreError
from kvfuse.hf._reuse import SharedCores, _cores
from kvfuse.store import KVPool, Loading, Namespace, TieredStore
from kvfuse.store._promote import Promotion, promotion_steps


@pytest.fixture
def four_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def _gated(movers: ThreadPoolExecutor, fail_at: int | None = None) -> tuple[Loading, list[threading.Event]]:
    """A loading of one 4-layer promotion whose steps (layers 0, 1, 2-3) each wait for their gate."""
    steps = promotion_steps(4)
    gates = [threading.Event() for _ in steps]

    def move(layers: range) -> None:
        i = [r.start for r in steps].index(layers.start)
        gates[i].wait(10)
        if i == fail_at:
            raise OSError("the disk went away")

    loading = Loading(movers)
    loading.add(Promotion("a", steps, move, lambda: None, "disk"))
    loading.start()
    return loading, gates


def test_the_movers_get_their_cores_until_the_last_layer_moved(four_threads: None) -> None:
    with ThreadPoolExecutor(2) as movers:
        loading, gates = _gated(movers)
        cores = SharedCores(loading, movers=2)
        cores.share()
        assert torch.get_num_threads() == 2  # 4 cores, 2 movers
        gates[0].set()
        cores(0)
        assert torch.get_num_threads() == 2  # layers 1-3 still moving
        gates[1].set(), gates[2].set()
        cores(1)  # the last promotion is done by the time it is waited for, or soon after
        loading.wait_all()
        cores(2)
        assert torch.get_num_threads() == 4 and not cores.sharing
        cores(3)  # decode steps: nothing to give back, nothing changes
        assert torch.get_num_threads() == 4


def test_nothing_moving_shares_nothing(four_threads: None) -> None:
    with ThreadPoolExecutor(2) as movers:
        cores = SharedCores(Loading(movers), movers=2)
        cores.share()
        assert torch.get_num_threads() == 4 and not cores.sharing
        one = SharedCores(Loading(movers), movers=8)
        assert one.lent == 1  # never fewer than one thread


def test_a_failed_request_gives_the_cores_back(four_threads: None) -> None:
    ns = Namespace(model_id="tiny", num_layers=4, num_kv_heads=1, head_dim=8, dtype="fp32", page_size=4)
    store = TieredStore(ns, KVPool(ns, 4))
    with ThreadPoolExecutor(2) as movers:
        loading, gates = _gated(movers, fail_at=1)
        with pytest.raises(StoreError, match="disk went away"), _cores(store, loading) as ready:
            assert ready is not None and torch.get_num_threads() == 2
            for gate in gates:
                gate.set()
            for layer in range(4):
                ready(layer)
        assert torch.get_num_threads() == 4
