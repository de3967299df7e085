"""kvfuse's TCP transport: pages bit-exact between two real processes in any layout, a
receiver that refuses a bad message (or a sender without its key) before writing a byte,
a sender that sends nothing to a receiver without its key, and a dead, refusing or
stalled peer a TransferError naming every page, never a hang. It listens on 127.0.0.1
only, so these tests need no network namespace."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import kvfuse
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvfuse.transfer import TcpTransport
from kvfuse.transfer._peer import page_digest
from kvfuse.transfer._tcp import HELLO, NONCE, REFUSED, TAG
from transfercases import Peer, message, pool, rogue_send


@pytest.fixture
def sender() -> Iterator[TcpTransport]:
    t = kvfuse.registry().transport("tcp")()
    assert isinstance(t, TcpTransport)
    yield t
    t.close()


def test_pages_arrive_bit_exact_in_another_process(sender: TcpTransport) -> None:
    """Scattered pages, runs, and more pages than one sendmsg takes (IOV_MAX), blocking
    and not; pages never sent stay invalid."""
    peer = Peer(num_pages=2400, transport="tcp")
    try:
        k, v = pool(1200)
        g = torch.Generator().manual_seed(1)
        sends = [
            ([5, 199, 0, 70, 71], [2399, 0, 150, 1, 2]),
            (list(range(600, 1200)), torch.randperm(2400, generator=g)[:600].tolist()),
            (torch.randperm(1200, generator=g).tolist(), list(range(1200, 2400))),  # 2400 iovecs: three calls
        ]
        for i, (src, dst) in enumerate(sends):
            handle = sender.send_pages(k, v, src, peer.descriptor, dst, non_blocking=i % 2 == 1)
            handle.wait(timeout=60)
            assert handle.done()
            peer.ask(op="valid", pages=dst)
            got = peer.ask(op="digest", pages=dst)["digests"]
            assert got == [page_digest(k, v, s) for s in src]
        assert peer.ask(op="digest", pages=[3])["digests"] == [None]  # never sent: not valid
    finally:
        peer.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[TcpTransport, torch.Tensor, torch.Tensor, dict]]:  # type: ignore[type-arg]
    t = TcpTransport()
    k, v = torch.zeros(64, 2, 2, 4), torch.zeros(64, 2, 2, 4)
    desc = t.register_pool(k, v)
    yield t, k, v, desc  # type: ignore[misc]
    t.close()


@settings(max_examples=40, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_pages_to_any_pages_move_exact_bits_and_touch_nothing_else(data: st.DataObject, dtype: torch.dtype) -> None:
    rx, tx = TcpTransport(), TcpTransport()
    try:
        num_src, num_dst = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
        n = data.draw(st.integers(0, min(num_src, num_dst)))
        src = data.draw(st.lists(st.integers(0, num_src - 1), min_size=n, max_size=n))  # repeats allowed
        dst = data.draw(st.permutations(range(num_dst)))[:n]
        word = torch.int16 if dtype == torch.bfloat16 else torch.int32
        info = torch.iinfo(word)
        bits = torch.randint(info.min, info.max, (2, num_src, 4, 2, 8), dtype=word)  # NaN payloads too
        k, v = bits[0].view(dtype), bits[1].view(dtype)
        dk, dv = torch.full((num_dst, 4, 2, 8), 7.0, dtype=dtype), torch.full((num_dst, 4, 2, 8), 7.0, dtype=dtype)
        before_k, before_v = dk.clone(), dv.clone()
        tx.send_pages(k, v, src, rx.register_pool(dk, dv), dst).wait(timeout=30)
        ek, ev = before_k.clone(), before_v.clone()
        if n:
            ek[dst], ev[dst] = k[src], v[src]
        assert torch.equal(dk.view(torch.uint8), ek.view(torch.uint8))
        assert torch.equal(dv.view(torch.uint8), ev.view(torch.uint8))
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize(
    ("why", "ids", "fields"),
    [
        ("bad magic", [0], {"magic": b"XXXX"}),
        ("unknown version", [0], {"version": 9}),
        ("unknown pool", [0], {"pool": 12345}),
        ("other page size", [0], {"page_bytes": 8}),
        ("more pages than the pool", [*range(64), 0], {}),
        ("id out of range", [3, 64], {}),
        ("repeated id", [5, 5], {}),
    ],
)
def test_a_bad_message_is_refused_before_a_byte_lands(receiver: tuple, why: str, ids: list[int], fields: dict) -> None:  # type: ignore[type-arg]
    rx, k, v, desc = receiver
    k.fill_(0), v.fill_(0)
    refused = rx.refused
    payload = b"\xff" * (2 * len(ids) * desc["page_bytes"])
    assert rogue_send(desc, message(desc, ids, **fields) + payload) in (REFUSED, b""), why
    assert rx.refused == refused + 1
    assert not k.any() and not v.any(), why


def test_a_sender_gone_mid_message_leaves_the_receiver_serving(receiver: tuple) -> None:  # type: ignore[type-arg]
    _, k, v, desc = receiver
    assert rogue_send(desc, message(desc, [1, 2]) + b"\x01" * 10) == b""  # closed mid-payload: no OK
    tx = TcpTransport()
    try:
        src_k, src_v = torch.randn(4, 2, 2, 4), torch.randn(4, 2, 2, 4)
        tx.send_pages(src_k, src_v, [0, 3], desc, [1, 2]).wait(timeout=10)
        assert torch.equal(k[[1, 2]], src_k[[0, 3]]) and torch.equal(v[[1, 2]], src_v[[0, 3]])
    finally:
        tx.close()


def test_a_peer_that_died_refused_or_stalled_is_a_transfer_error_naming_every_page(sender: TcpTransport) -> None:
    k, v = pool(8)
    peer = Peer(num_pages=8, transport="tcp")
    desc = peer.descriptor
    peer.close()  # died: nothing listens there any more
    with pytest.raises(kvfuse.TransferError) as info:
        sender.send_pages(k, v, [0, 1], desc, [4, 5]).wait(timeout=10)
    assert info.value.failed_pages == [4, 5]

    rx = TcpTransport()
    try:
        live = rx.register_pool(*pool(8))
        with pytest.raises(kvfuse.TransferError, match="refused") as info:  # a pool it never registered
            sender.send_pages(k, v, [0], {**live, "k_addr": 1}, [3]).wait(timeout=10)  # type: ignore[typeddict-item]
        assert info.value.failed_pages == [3]
    finally:
        rx.close()

    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    stalled = {**desc, "session": f"127.0.0.1:{silent.getsockname()[1]}"}
    impatient = TcpTransport(timeout=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(kvfuse.TransferError) as info:
            impatient.send_pages(k, v, [0, 1, 2], stalled, [5, 6, 7], non_blocking=True).wait(timeout=10)  # type: ignore[arg-type]
        assert info.value.failed_pages == [5, 6, 7] and time.monotonic() - start < 5
    finally:
        impatient.close()
        silent.close()
        for s in accepted:
            s.close()


def test_a_bad_send_is_refused_before_connecting(sender: TcpTransport, receiver: tuple) -> None:  # type: ignore[type-arg]
    rx, _, _, desc = receiver
    k, v = torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4)
    served = rx.refused
    for src, dst, peer, match, argument in (
        ([0], [64], desc, "out of range", "dst_ids"),
        ([4], [0], desc, "out of range", "src_ids"),
        ([0, 1], [2, 2], desc, "repeated", "dst_ids"),
        ([0, 1], [2], desc, "different lengths", "dst_ids"),
        ([0], [0], {**desc, "page_bytes": 7}, "geometry", "peer"),
    ):
        with pytest.raises(kvfuse.TransferError, match=match) as info:
            sender.send_pages(k, v, src, peer, dst)  # type: ignore[arg-type]
        assert info.value.failed_pages == dst and str(info.value).startswith(f"{argument}: ")
    assert rx.refused == served  # nothing reached the receiver
    with pytest.raises(kvfuse.TransferError, match="host memory"):
        sender.register_pool(torch.empty(4, 16, 4, 64, device="meta"), torch.empty(4, 16, 4, 64, device="meta"))


KEY, OTHER = b"k" * 32, b"o" * 32


@pytest.mark.parametrize(("rx_key", "tx_key"), [(KEY, None), (None, KEY), (KEY, OTHER)])
def test_ends_without_the_same_key_exchange_no_page(rx_key: bytes | None, tx_key: bytes | None) -> None:
    rx, tx = TcpTransport(key=rx_key), TcpTransport(key=tx_key)
    try:
        dk, dv = torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4)
        desc = rx.register_pool(dk, dv)
        with pytest.raises(kvfuse.TransferError, match="key") as info:
            tx.send_pages(torch.ones(4, 2, 2, 4), torch.ones(4, 2, 2, 4), [0, 1], desc, [2, 3]).wait(timeout=10)
        assert info.value.failed_pages == [2, 3]
        assert not dk.any() and not dv.any() and rx.refused == 1
    finally:
        tx.close()
        rx.close()
    rx, tx = TcpTransport(key=KEY), TcpTransport(key=KEY)  # the same key: pages flow
    try:
        dk, dv = torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4)
        tx.send_pages(torch.ones(4, 2, 2, 4), torch.ones(4, 2, 2, 4), [0], rx.register_pool(dk, dv), [3]).wait(10)
        assert dk[3].eq(1).all() and not dk[:3].any()
    finally:
        tx.close()
        rx.close()


def test_a_sender_sends_no_page_to_a_receiver_without_its_key() -> None:
    """An impostor listening where the pages should go answers the handshake with a wrong
    tag: the sender stops there, and not one payload byte reaches the impostor."""
    impostor = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def play() -> None:
        conn, _ = impostor.accept()
        with conn:
            conn.sendall(HELLO + bytes(NONCE))
            seen.append(conn.recv(NONCE + TAG, socket.MSG_WAITALL))
            conn.sendall(bytes(TAG))  # it cannot compute the tag
            conn.settimeout(5)
            while chunk := conn.recv(1 << 16):
                seen.append(chunk)

    player = threading.Thread(target=play, daemon=True)
    player.start()
    tx = TcpTransport(key=KEY)
    desc = {"transport": "tcp", "session": f"127.0.0.1:{impostor.getsockname()[1]}", "k_addr": 1, "v_addr": 2}
    try:
        with pytest.raises(kvfuse.TransferError, match="key") as info:
            tx.send_pages(*pool(2), [0, 1], {**desc, "page_bytes": 8192, "num_pages": 2}, [1, 0])  # type: ignore[arg-type]
        assert info.value.failed_pages == [1, 0]
    finally:
        tx.close()
        player.join(timeout=10)
        impostor.close()
    assert len(seen) == 1 and len(seen[0]) == NONCE + TAG  # the handshake, and nothing after it


def test_a_key_of_the_wrong_size_is_refused() -> None:
    for key in (b"short", b"x" * 65, "a str key"):
        with pytest.raises(kvfuse.TransferError, match="key"):
            TcpTransport(key=key)  # type: ignore[arg-type]


def test_a_timeout_that_is_not_seconds_above_zero_is_refused() -> None:
    for timeout in (0, -1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(kvfuse.TransferError, match="timeout"):
            TcpTransport(timeout=timeout)  # type: ignore[arg-type]


def test_a_connection_the_receiver_dropped_while_idle_is_made_anew() -> None:
    rx, tx = TcpTransport(timeout=0.3), TcpTransport()
    try:
        dk, dv = torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4)
        desc = rx.register_pool(dk, dv)
        src_k, src_v = torch.randn(4, 2, 2, 4), torch.randn(4, 2, 2, 4)
        tx.send_pages(src_k, src_v, [0], desc, [0]).wait(timeout=10)
        time.sleep(0.8)  # the receiver gives up on the idle connection
        tx.send_pages(src_k, src_v, [1, 2], desc, [1, 2]).wait(timeout=10)
        assert torch.equal(dk[:3], src_k[:3]) and torch.equal(dv[:3], src_v[:3])
    finally:
        tx.close()
        rx.close()


def test_no_page_lands_after_the_receiver_closes() -> None:
    rx, tx = TcpTransport(), TcpTransport()
    dk, dv = torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4)
    desc = rx.register_pool(dk, dv)
    try:
        tx.send_pages(torch.ones(4, 2, 2, 4), torch.ones(4, 2, 2, 4), [0], desc, [0]).wait(timeout=10)
        rx.close()  # the sender's connection is still open on its side
        with pytest.raises(kvfuse.TransferError) as info:
            tx.send_pages(torch.ones(4, 2, 2, 4), torch.ones(4, 2, 2, 4), [1], desc, [1]).wait(timeout=10)
        assert info.value.failed_pages == [1]
        assert dk[0].eq(1).all() and not dk[1:].any() and not dv[1:].any()
    finally:
        tx.close()
        rx.close()
