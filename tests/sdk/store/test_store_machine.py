"""The store's bookkeeping under interleavings (hypothesis state machine): several open
requests, fills, commits, closes, aborts, puts, fetches, pins, pool pressure and a disk
that fails, on a pool small enough that every step can evict.

Invariants after every step:
- every page has one owner: free, a chunk on the device, or one open request (or the
  test's own scratch allocation) — and the store's lent set is exactly the requests' and
  the scratch's pages;
- every page a request or a pin holds (and every fetch returns) holds that chunk's KV,
  and host copies hold their chunk's KV;
- a chunk leaves the store only by eviction from the last tier;
- only StoreError escapes a call.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator

import hypothesis.strategies as st
import kvfuse
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kvfuse.store import KVPool, Namespace, Plan, TieredStore, chunk_key, plan
from storecases import disk_full

NS = Namespace(model_id="machine", num_layers=2, num_kv_heads=1, head_dim=4, dtype="fp32", page_size=4)
LENGTHS = [1, 3, 4, 5, 8, 9]
TOKENS = [[100 * c + j for j in range(n)] for c, n in enumerate(LENGTHS)]
KEYS = [chunk_key(NS, t) for t in TOKENS]
POOL_PAGES = 10
CHUNK_BYTES = 2 * 2 * 9 * 4 * 4  # the largest chunk, K and V


def kv(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk c's KV: [num_layers, num_tokens, 1, 4], fp32, distinct for every chunk."""
    tokens = torch.tensor(TOKENS[c], dtype=torch.float32)[None, :, None, None]
    k = tokens * 10 + torch.arange(2.0)[:, None, None, None] + torch.tensor([0.0, 0.1, 0.2, 0.3])
    return k, -k


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvfuse-machine-")
        self.store = TieredStore(
            NS, KVPool(NS, POOL_PAGES), host_bytes=2 * CHUNK_BYTES, disk_dir=self.dir, disk_bytes=4 * CHUNK_BYTES
        )
        self.plans: list[tuple[Plan, list[int]]] = []
        self.filled: dict[int, set[int]] = {}  # id(plan) -> misses whose pages hold their KV
        self.scratch: list[list[int]] = []
        self.user_pins: list[int] = []  # chunk ids pinned by the "user" holder
        self.stored: set[int] = set()  # chunks the store should still know
        self.disk_full = False
        self.errors = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Around every store call: the disk fault if on; StoreError is an allowed outcome."""
        try:
            with disk_full(self.disk_full):
                yield
        except kvfuse.StoreError:
            self.errors += 1

    def known(self) -> None:
        self.stored |= {c for c, key in enumerate(KEYS) if self.store.tier(key) is not None}

    # -- requests ---------------------------------------------------------------------------

    @rule(cs=st.lists(st.integers(0, 5), min_size=1, max_size=4), live=st.integers(0, 9))
    def open_request(self, cs: list[int], live: int) -> None:
        with self.call():
            p = plan(self.store, [TOKENS[c] for c in cs], live)
            self.plans.append((p, cs))
            self.filled[id(p)] = set()
        self.known()

    @precondition(lambda self: self.plans)
    @rule(data=st.data(), live=st.integers(0, 4))
    def open_same_documents(self, data: st.DataObject, live: int) -> None:
        """A second request for the documents of an open one (concurrent RAG queries on
        the same retrieval): both may miss the same chunks and fill them."""
        _, cs = data.draw(st.sampled_from(self.plans))
        self.open_request(cs, live)

    def _unfilled(self) -> list[tuple[Plan, list[int], int]]:
        return [(p, cs, i) for p, cs in self.plans for i in p.misses if i not in self.filled[id(p)]]

    @precondition(lambda self: self._unfilled())
    @rule(data=st.data())
    def fill(self, data: st.DataObject) -> None:
        p, cs, i = data.draw(st.sampled_from(self._unfilled()))
        self.store.pool.write(p.pages[i], *kv(cs[i]))  # what a prefill writes with append_kv
        self.filled[id(p)].add(i)

    def _committable(self) -> list[tuple[Plan, int]]:
        return [(p, i) for p, _ in self.plans for i in self.filled[id(p)] if i not in p.committed]

    @precondition(lambda self: self._committable())
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        p, i = data.draw(st.sampled_from(self._committable()))
        with self.call():
            p.commit(i)
        self.known()

    @precondition(lambda self: self.plans)
    @rule(data=st.data(), abort=st.booleans())
    def close(self, data: st.DataObject, abort: bool) -> None:
        p, cs = data.draw(st.sampled_from(self.plans))
        p.abort() if abort else p.close()
        p.close()  # a second close gives back nothing twice
        self.plans.remove((p, cs))

    # -- direct calls -----------------------------------------------------------------------

    @rule(c=st.integers(0, 5))
    def put(self, c: int) -> None:
        with self.call():
            pages = self.store.put(KEYS[c], *kv(c))
            self.check_pages(pages, c)
        self.known()

    @rule(c=st.integers(0, 5), hold=st.booleans())
    def fetch(self, c: int, hold: bool) -> None:
        with self.call():
            pages = self.store.fetch(KEYS[c], holder="user" if hold else None)
            if pages is not None:
                self.check_pages(pages, c)
                if hold:
                    self.user_pins.append(c)

    @precondition(lambda self: self.user_pins)
    @rule(data=st.data())
    def unhold(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self.user_pins))
        self.store.unhold(KEYS[c], "user")
        self.user_pins.remove(c)

    @rule(n=st.integers(1, 4 * POOL_PAGES))
    def pressure(self, n: int) -> None:
        with self.call():
            self.scratch.append(self.store.allocate(n))

    @precondition(lambda self: self.scratch)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pages = data.draw(st.sampled_from(self.scratch))
        self.store.release(pages)
        self.scratch.remove(pages)

    @rule(on=st.booleans())
    def disk_fault(self, on: bool) -> None:
        self.disk_full = on

    # -- invariants -------------------------------------------------------------------------

    def check_pages(self, pages: list[int], c: int) -> None:
        k, v = self.store.pool.read(pages, LENGTHS[c])
        want_k, want_v = kv(c)
        assert torch.equal(k, want_k) and torch.equal(v, want_v), f"pages {pages} do not hold chunk {c}"

    @invariant()
    def one_owner_per_page(self) -> None:
        owners = self.store.audit()  # raises if a page has two owners or none
        lent = sorted(x for p, _ in self.plans for x in p.lent()) + [x for s in self.scratch for x in s]
        assert sorted(lent) == owners["lent"]

    @invariant()
    def requests_and_pins_see_their_kv(self) -> None:
        for p, cs in self.plans:
            for i in set(p.hits) | p.committed:
                for j, c in enumerate(cs):  # every occurrence shares the pages
                    if KEYS[c] == p.keys[i]:
                        self.check_pages(p.pages[j], c)
                assert self.store.pins(p.keys[i]).get(p) == 1, "a request pins each of its chunks once"
        for c in set(self.user_pins):
            assert self.store.tier(KEYS[c]) == "device"
            assert self.store.pins(KEYS[c]).get("user") == self.user_pins.count(c)

    @invariant()
    def host_copies_hold_their_kv(self) -> None:
        for c, key in enumerate(KEYS):
            e = self.store._entries.get(key)
            if e is not None and e.tier == "host":
                assert e.host is not None  # padded to whole pages
                assert all(torch.equal(a[:, : e.num_tokens], b) for a, b in zip(e.host, kv(c)))

    @invariant()
    def chunks_leave_only_by_eviction(self) -> None:
        gone = {c for c in self.stored if self.store.tier(KEYS[c]) is None}
        drops = self.store.stats.demotions["host->drop"] + self.store.stats.demotions["disk->drop"]
        assert len(gone) <= drops - getattr(self, "_drops_seen", 0), f"chunks {gone} lost"
        self._drops_seen = drops
        self.stored -= gone


StoreMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,  # the same interleavings in every run (CI finds what a dev finds)
    database=None,
    suppress_health_check=list(HealthCheck),
)
TestStoreMachine = StoreMachine.TestCase
