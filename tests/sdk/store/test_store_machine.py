"""The store's bookkeeping under interleavings (hypothesis state machine): several open
requests, fills, commits, closes, aborts, puts, fetches, pins, pool pressure, a disk
that fails and disk files corrupted behind the store's back, on a pool small enough that
every step can evict, and explicit demotions. Requests may promote their hits layer by layer (host and disk
chunks on the mover threads), and other steps run while those promotions are in flight.

Invariants after every step:
- every page has one owner: free, a chunk on the device, or one open request (or the
  test's own scratch allocation) — and the store's lent set is exactly the requests' and
  the scratch's pages;
- every page a request or a pin holds (and every fetch returns) holds that chunk's KV,
  and host copies hold their chunk's KV;
- a chunk leaves the store only by eviction from the last tier, or by failing its
  checksum after its file was corrupted (and then the promotion's request gets a
  StoreError, never wrong KV);
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
        self.store.host_layerwise = True  # host chunks on the movers too
        self.disk_full = False
        self.errors = 0
        self.corrupted: set[int] = set()  # chunks whose file was damaged: they may vanish
        self.failed: set[int] = set()  # id() of requests whose promotion failed (a checksum)

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

    @rule(cs=st.lists(st.integers(0, 5), min_size=1, max_size=4), live=st.integers(0, 9), layerwise=st.booleans())
    def open_request(self, cs: list[int], live: int, layerwise: bool = False) -> None:
        with self.call():
            loading = self.store.loading() if layerwise else None
            p = plan(self.store, [TOKENS[c] for c in cs], live, loading=loading)
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

    @rule(layerwise=st.booleans())
    def host_moves(self, layerwise: bool) -> None:
        """Host chunks of later requests move layer by layer on the movers (the GPU
        default), or whole, inline, when the request's loading starts (the cpu's)."""
        self.store.host_layerwise = layerwise

    def _lower(self) -> list[int]:
        return [c for c, key in enumerate(KEYS) if self.store.tier(key) in ("host", "disk")]

    @precondition(lambda self: self._lower())
    @rule(data=st.data(), live=st.integers(0, 4))
    def open_layerwise_from_lower_tiers(self, data: st.DataObject, live: int) -> None:
        """A request whose hits move up layer by layer while later steps run."""
        cs = data.draw(st.lists(st.sampled_from(self._lower()), min_size=1, max_size=3))
        self.open_request(cs, live, layerwise=True)

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

    @rule(c=st.integers(0, 5), to=st.sampled_from(["host", "disk"]))
    def demote(self, c: int, to: str) -> None:
        with self.call():
            if self.store.tier(KEYS[c]) is not None:
                self.store.demote(KEYS[c], to)
                assert self.store.tier(KEYS[c]) in (("host", "disk") if to == "host" else ("disk",))

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

    def _on_disk(self) -> list[int]:
        return [c for c, key in enumerate(KEYS) if self.store.tier(key) == "disk"]

    @precondition(lambda self: self._on_disk())
    @rule(data=st.data(), at=st.integers(1, 64))
    def corrupt_file(self, data: st.DataObject, at: int) -> None:
        """Flip a payload byte of a disk chunk's file (bit rot, a stray writer)."""
        c = data.draw(st.sampled_from(self._on_disk()))
        path = self.store.disk.path(KEYS[c])  # type: ignore[union-attr]
        with contextlib.suppress(FileNotFoundError):
            data = bytearray(path.read_bytes())
            data[-min(at, 2 * LENGTHS[c] * 16)] ^= 0x40
            path.write_bytes(bytes(data))
            self.corrupted.add(c)

    # -- invariants -------------------------------------------------------------------------

    def settle(self) -> None:
        """Every promotion in flight runs to its end before the invariants and the next
        step's preconditions look (hypothesis needs each step's outcome to be
        deterministic); a request waits before it reads its promoted hits."""
        for p, cs in self.plans:
            if p.loading is not None and id(p) not in self.failed:
                try:
                    p.loading.wait_all()
                except kvfuse.StoreError as exc:
                    assert "checksum" in str(exc) and {cs[i] for i in p.hits} & self.corrupted, exc
                    self.failed.add(id(p))
        for e in list(self.store._entries.values()):  # of requests that closed before waiting
            if e.promotion is not None:
                e.promotion.wait_finished()
        self.store.audit()  # settles finished promotions

    def check_pages(self, pages: list[int], c: int) -> None:
        k, v = self.store.pool.read(pages, LENGTHS[c])
        want_k, want_v = kv(c)
        assert torch.equal(k, want_k) and torch.equal(v, want_v), f"pages {pages} do not hold chunk {c}"

    @invariant()
    def one_owner_per_page(self) -> None:
        self.settle()
        owners = self.store.audit()  # raises if a page has two owners or none
        lent = sorted(x for p, _ in self.plans for x in p.lent()) + [x for s in self.scratch for x in s]
        assert sorted(lent) == owners["lent"]

    @invariant()
    def requests_and_pins_see_their_kv(self) -> None:
        self.settle()
        for p, cs in self.plans:
            if id(p) in self.failed:
                continue
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
        self.settle()
        for c, key in enumerate(KEYS):
            e = self.store._entries.get(key)
            if e is not None and e.tier == "host":
                assert e.host is not None  # padded to whole pages
                assert all(torch.equal(a[:, : e.num_tokens], b) for a, b in zip(e.host, kv(c)))

    @invariant()
    def chunks_leave_only_by_eviction(self) -> None:
        self.settle()
        gone = {c for c in self.stored - self.corrupted if self.store.tier(KEYS[c]) is None}
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
