"""Page transfer between two real processes over Mooncake Transfer Engine (TCP, 127.0.0.1)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import torch

pytestmark = pytest.mark.netns  # see the Makefile: run inside a private network namespace
pytest.importorskip("mooncake.engine")

import kvfuse
from kvfuse.transfer import MooncakeTransport
from kvfuse.transfer._peer import page_digest
from transfercases import GEOMETRY, Peer, pool


@pytest.fixture
def sender() -> Iterator[MooncakeTransport]:
    t = kvfuse.registry().transport("mooncake")()
    assert isinstance(t, MooncakeTransport)
    yield t
    t.close()


def test_pages_arrive_bit_exact(sender: MooncakeTransport) -> None:
    peer = Peer(num_pages=300)
    try:
        k, v = pool(200)
        sender.register_pool(k, v)
        src, dst = [5, 199, 0, 70, 71], [299, 0, 150, 1, 2]
        handle = sender.send_pages(k, v, src, peer.descriptor, dst, non_blocking=True)
        handle.wait(timeout=60)
        assert handle.done()
        peer.ask(op="valid", pages=dst)
        got = peer.ask(op="digest", pages=[*dst, 3])["digests"]
        assert got[:-1] == [page_digest(k, v, s) for s in src]
        assert got[-1] is None  # never sent: not valid
    finally:
        peer.close()


def test_many_batches_in_flight_with_runs_and_scattered_pages_arrive_bit_exact(sender: MooncakeTransport) -> None:
    """More pages than IN_FLIGHT batches hold, part of them in runs consecutive on both
    sides (merged into one slice each), part scattered."""
    from kvfuse.transfer._mooncake import BATCH_PAGES, IN_FLIGHT

    n = BATCH_PAGES * IN_FLIGHT + 300
    peer = Peer(num_pages=2 * n)
    try:
        k, v = pool(n)
        sender.register_pool(k, v)
        g = torch.Generator().manual_seed(1)
        src = list(range(n // 2)) + (torch.randperm(n - n // 2, generator=g) + n // 2).tolist()
        dst = list(range(n, n + n // 2)) + torch.randperm(n, generator=g)[: n - n // 2].tolist()
        sender.send_pages(k, v, src, peer.descriptor, dst).wait(timeout=120)
        sample = sorted(torch.randperm(n, generator=g)[:64].tolist())
        peer.ask(op="valid", pages=dst)
        got = peer.ask(op="digest", pages=[dst[i] for i in sample])["digests"]
        assert got == [page_digest(k, v, src[i]) for i in sample]
    finally:
        peer.close()


def test_scattered_sources_to_destination_runs_go_gathered_in_few_slices(
    sender: MooncakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sources anywhere, destinations in runs (a decode pool lending fresh pages): the
    pages are gathered into the registered stage in destination order and sent as one
    slice per run and batch; a later, larger send grows the stage. Every page bit-exact."""
    import kvfuse.transfer._mooncake as mc

    slices: list[int] = []
    real = mc._slices
    monkeypatch.setattr(mc, "_slices", lambda *a: slices.append(len((r := real(*a))[2])) or r)
    peer = Peer(num_pages=1200)
    try:
        k, v = pool(700)
        sender.register_pool(k, v)
        g = torch.Generator().manual_seed(3)
        for n, first in ((300, 0), (640, 500)):
            slices.clear()
            src = torch.randperm(700, generator=g)[:n].tolist()
            dst = list(range(first, first + n))
            mix = torch.randperm(n, generator=g).tolist()  # pairs given in any order
            sender.send_pages(k, v, [src[i] for i in mix], peer.descriptor, [dst[i] for i in mix]).wait(timeout=120)
            assert sum(slices) <= 2 * -(-n // mc.BATCH_PAGES)  # K and V: one slice per batch, not per page
            peer.ask(op="valid", pages=dst)
            got = peer.ask(op="digest", pages=dst)["digests"]
            assert got == [page_digest(k, v, s) for s in src]
    finally:
        peer.close()


def test_peer_killed_mid_transfer_names_the_pages(sender: MooncakeTransport) -> None:
    peer = Peer(num_pages=4096)
    k, v = pool(4096)
    sender.register_pool(k, v)
    ids = list(range(4096))
    handle = sender.send_pages(k, v, ids, peer.descriptor, ids, non_blocking=True)
    deadline = time.monotonic() + 60
    while sender.progress == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    peer.proc.kill()  # mid-transfer: no "valid" message was ever sent for these pages
    peer.close()
    with pytest.raises(kvfuse.TransferError) as info:
        handle.wait(timeout=120)
    failed = info.value.failed_pages
    assert failed and set(failed) <= set(ids) and failed == ids[ids.index(failed[0]) :]
    assert failed[0] >= sender.progress - 64  # the pages after the last completed batch


def test_stalled_peer_is_a_transfer_error_within_the_timeout() -> None:
    """A receiver that stops answering (SIGSTOP: its connections stay open) makes the send
    a TransferError once the transport's timeout passes, not a hang. 256 MiB: far more
    than the kernel's socket buffers take in for the stopped receiver, so some batch
    stalls; the pages named are those from the first unfinished batch on."""
    sender = MooncakeTransport(timeout=2.0)
    n = 16384  # 8 KiB pages
    peer = Peer(num_pages=n)
    try:
        k, v = torch.zeros(n, *GEOMETRY, dtype=torch.bfloat16), torch.zeros(n, *GEOMETRY, dtype=torch.bfloat16)
        sender.register_pool(k, v)
        ids = list(range(n))
        sender.send_pages(k, v, [0], peer.descriptor, [0])  # the segment opened: the peer was alive
        peer.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(kvfuse.TransferError) as info:
            sender.send_pages(k, v, ids, peer.descriptor, ids).wait(timeout=60)
        assert time.monotonic() - start < 30
        failed = info.value.failed_pages
        assert failed and failed == ids[ids.index(failed[0]) :]
    finally:
        peer.proc.send_signal(signal.SIGCONT)
        peer.close()
        sender.close()


def test_a_timeout_that_is_not_seconds_above_zero_is_refused() -> None:
    for timeout in (0, -2.0, float("nan")):
        with pytest.raises(kvfuse.TransferError, match="timeout"):
            MooncakeTransport(timeout=timeout)


def test_bad_descriptor_is_rejected_before_sending(sender: MooncakeTransport) -> None:
    k, v = pool(4)
    desc = sender.register_pool(k, v)
    with pytest.raises(kvfuse.TransferError, match="out of range"):
        sender.send_pages(k, v, [0], desc, [4])
    with pytest.raises(kvfuse.TransferError, match="geometry"):
        sender.send_pages(k, v, [0], {**desc, "page_bytes": 7}, [0])  # type: ignore[typeddict-item]


def test_check_transport_passes_mooncake() -> None:
    from kvfuse.testing import check_transport

    assert check_transport(MooncakeTransport, timeout=30) == []
