"""The tcp transport as a state machine: senders and receivers in any interleaving of
sends (blocking, not, two at once into one pool), bad sends, rogue messages and senders
closed and made anew. After every step each receiver's pool holds exactly what a model
of the acknowledged sends says: every acknowledged page its source's bits, nothing else
changed."""

from __future__ import annotations

import kvfuse
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from kvfuse.transfer import TcpTransport
from transfercases import message, rogue_send

PAGES, SRC_PAGES, ROW = 12, 8, (2, 2, 4)  # pool pages, source pages, page = 2 tokens x 2 heads x 4


def _bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n, *ROW), generator=g, dtype=torch.int32).view(torch.float32)


class TransportMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.receivers = [TcpTransport() for _ in range(2)]
        self.pools = [(_bits(PAGES, 10 + i), _bits(PAGES, 20 + i)) for i in range(2)]
        self.model = [(k.clone(), v.clone()) for k, v in self.pools]
        self.descs = [rx.register_pool(*pool) for rx, pool in zip(self.receivers, self.pools)]
        self.senders = [TcpTransport() for _ in range(2)]
        self.sources = [(_bits(SRC_PAGES, 30 + i), _bits(SRC_PAGES, 40 + i)) for i in range(2)]
        self.made = 0  # senders made anew

    def teardown(self) -> None:
        for t in [*getattr(self, "senders", []), *getattr(self, "receivers", [])]:
            t.close()

    def _apply(self, s: int, r: int, src: list[int], dst: list[int]) -> None:
        k, v = self.sources[s]
        mk, mv = self.model[r]
        mk[dst], mv[dst] = k[src], v[src]

    @rule(
        s=st.integers(0, 1),
        r=st.integers(0, 1),
        data=st.data(),
        non_blocking=st.booleans(),
    )
    def send(self, s: int, r: int, data: st.DataObject, non_blocking: bool) -> None:
        n = data.draw(st.integers(0, SRC_PAGES))
        src = data.draw(st.lists(st.integers(0, SRC_PAGES - 1), min_size=n, max_size=n))
        dst = data.draw(st.permutations(range(PAGES)))[:n]
        self.senders[s].send_pages(*self.sources[s], src, self.descs[r], dst, non_blocking=non_blocking).wait(30)
        self._apply(s, r, src, dst)

    @rule(r=st.integers(0, 1), split=st.integers(1, PAGES - 1))
    def two_senders_at_once(self, r: int, split: int) -> None:
        """Both senders into one pool, on disjoint pages, neither awaited before the other starts."""
        order = list(range(PAGES))
        jobs = [(0, order[:split]), (1, order[split:])]
        handles = []
        for s, dst in jobs:
            src = [i % SRC_PAGES for i in dst]
            handles.append(self.senders[s].send_pages(*self.sources[s], src, self.descs[r], dst, non_blocking=True))
        for (s, dst), h in zip(jobs, handles):
            h.wait(30)
            self._apply(s, r, [i % SRC_PAGES for i in dst], dst)

    @rule(s=st.integers(0, 1), r=st.integers(0, 1), bad=st.sampled_from(["range", "repeat", "length"]))
    def bad_send(self, s: int, r: int, bad: str) -> None:
        src, dst = {"range": ([0], [PAGES]), "repeat": ([0, 1], [3, 3]), "length": ([0, 1], [3])}[bad]
        try:
            self.senders[s].send_pages(*self.sources[s], src, self.descs[r], dst)
        except kvfuse.TransferError as exc:
            assert exc.failed_pages == dst
        else:
            raise AssertionError(f"a send with a bad {bad} went through")

    @rule(r=st.integers(0, 1), ids=st.lists(st.integers(0, PAGES + 3), min_size=1, max_size=4))
    def rogue_message(self, r: int, ids: list[int]) -> None:
        """A message naming another pool (or bad ids): refused, and nothing lands."""
        desc = self.descs[r]
        rogue_send(desc, message(desc, ids, pool=desc["k_addr"] + 1) + bytes(2 * len(ids) * desc["page_bytes"]))

    @precondition(lambda self: self.made < 4)
    @rule(s=st.integers(0, 1))
    def remake_sender(self, s: int) -> None:
        self.senders[s].close()
        self.senders[s] = TcpTransport()
        self.made += 1

    @invariant()
    def pools_hold_exactly_the_acknowledged_pages(self) -> None:
        if not hasattr(self, "pools"):
            return
        for (k, v), (mk, mv) in zip(self.pools, self.model):
            assert torch.equal(k.view(torch.int32), mk.view(torch.int32))
            assert torch.equal(v.view(torch.int32), mv.view(torch.int32))


TransportMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=15, deadline=None)
test_tcp_transport_machine = TransportMachine.TestCase
