"""``kvfuse.testing.check_transport``: the properties every page transport must have, checked
on real transfers between two instances of it, as a list of problems (empty: none found).

A transport plugin's own tests assert ``check_transport(MyTransport) == []``; kvfuse's
tests do so for ``tcp`` and ``mooncake``. What it checks:

- ``register_pool`` gives a descriptor with every :class:`PoolDescriptor` field, named
  after the transport;
- pages arrive bit-exact (random bits, NaN payloads included), scattered on both sides,
  sources repeated, blocking and not; pages not sent are unchanged, and the source pool too;
- a bad send (a destination out of range, one named twice, lengths that differ, another
  page size) is a :class:`TransferError` naming every destination page, and nothing moves;
- a send to a receiver that has closed fails as a :class:`TransferError`, never hangs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from kvfuse._errors import TransferError
from kvfuse._transport import PoolDescriptor, Transport

PAGES, ROW = 24, (4, 2, 16)  # pages per pool; a page: 4 tokens x 2 kv heads x 16 (bf16: 256 bytes)


def _pool(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bits as bf16, NaN payloads and negative zeros included: ([PAGES, *ROW], bf16) x 2."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (2, PAGES, *ROW), generator=g, dtype=torch.int16)
    return bits[0].view(torch.bfloat16).contiguous(), bits[1].view(torch.bfloat16).contiguous()


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))


def _within(seconds: float, fn: Callable[[], Any]) -> tuple[bool, BaseException | None]:
    """Run ``fn`` in a thread: (finished in time, the exception it raised)."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller
            box[0] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box[0]


def _send_and_wait(send: Callable[[], Any], timeout: float) -> None:
    send().wait(timeout)


def check_transport(factory: Callable[[], Transport], timeout: float = 60.0) -> list[str]:
    """Problems found with the transport that ``factory`` makes (two instances talk to
    each other in this process); ``timeout``: seconds any one send may take."""
    problems: list[str] = []
    receiver, sender = factory(), factory()
    closed = False
    try:
        dst = _pool(1)
        desc = receiver.register_pool(*dst)
        missing = set(PoolDescriptor.__annotations__) - set(desc)
        if missing or desc.get("transport") != getattr(factory, "name", desc.get("transport")):
            problems.append(f"register_pool: descriptor {desc} lacks {sorted(missing)} or names another transport")
        src = _pool(2)
        sender.register_pool(*src)
        src_before, expect = (src[0].clone(), src[1].clone()), (dst[0].clone(), dst[1].clone())
        g = torch.Generator().manual_seed(3)
        for non_blocking in (False, True):
            n = PAGES // 2
            s_ids = torch.randint(0, PAGES, (n,), generator=g).tolist()
            d_ids = torch.randperm(PAGES, generator=g)[:n].tolist()
            send = functools.partial(sender.send_pages, *src, s_ids, desc, d_ids, non_blocking=non_blocking)
            ok, error = _within(timeout, functools.partial(_send_and_wait, send, timeout))
            if not ok or error is not None:
                problems.append(f"send (non_blocking={non_blocking}): {'hung' if not ok else repr(error)}")
                continue
            expect[0][d_ids], expect[1][d_ids] = src[0][s_ids], src[1][s_ids]
            if not _same(dst, expect):
                problems.append(f"send (non_blocking={non_blocking}): the pool is not the sent pages and nothing else")
        if not _same(src, src_before):
            problems.append("send: the source pool changed")
        bad: list[tuple[str, list[int], list[int], dict[str, Any]]] = [
            ("a destination out of range", [0], [PAGES], {}),
            ("a destination named twice", [0, 1], [3, 3], {}),
            ("lengths that differ", [0, 1], [3], {}),
            ("another page size", [0], [3], {"page_bytes": desc["page_bytes"] + 2}),
        ]
        for why, s_ids, d_ids, change in bad:
            before = (dst[0].clone(), dst[1].clone())
            try:
                sender.send_pages(*src, s_ids, {**desc, **change}, d_ids).wait(timeout)  # type: ignore[typeddict-item]
                problems.append(f"a send with {why} went through")
            except TransferError as exc:
                if exc.failed_pages != d_ids:
                    problems.append(f"a send with {why}: failed_pages {exc.failed_pages}, expected {d_ids}")
            except Exception as exc:
                problems.append(f"a send with {why} raised {exc!r}, not TransferError")
            if not _same(dst, before):
                problems.append(f"a send with {why} changed the destination pool")
        receiver.close()
        closed = True
        ok, error = _within(timeout + 5, lambda: sender.send_pages(*src, [0], desc, [1]).wait(timeout))
        if not ok:
            problems.append("a send to a closed receiver hung")
        elif not isinstance(error, TransferError):
            problems.append(f"a send to a closed receiver gave {error!r}, not TransferError")
    finally:
        sender.close()
        if not closed:
            receiver.close()
    return problems
