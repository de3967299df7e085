"""Promotions: a chunk's layers moving from the host or disk tier into its device pages on
the store's mover threads, layer by layer.

A request that passes a :class:`Loading` to the store gets its hits' pages at once and
calls ``loading.wait(i)`` before layer ``i``'s attention reads them: layer 0 computes
while later layers are still on their way (LMCache retrieves layer by layer too). The
movers take layers in order, all of a request's chunks for one layer before the next
layer, two layers at a time (one thread reads or hashes while the other does).

A layer is ready only once it is in the pool and, when it came from the disk, its digest
matched. A layer that fails fails its promotion: layers not started yet are not moved
(the other mover may finish the one it has), and ``wait`` on any layer that was not
moved raises :class:`StoreError` — it never returns with wrong KV. The store then drops
the chunk (a miss for the next request; its pages come back when the failed request lets
go of them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvfuse._errors import StoreError


class Promotion:
    """One chunk's layers moving into its pages; ``move(i)`` copies layer ``i``."""

    def __init__(
        self, key: str, num_layers: int, move: Callable[[int], None], finish: Callable[[], None], source: str
    ) -> None:
        self.key, self.source = key, source
        self._move, self._finish = move, finish
        self._moved = [False] * num_layers
        self._done = [False] * num_layers
        self._left = num_layers
        self._cond = threading.Condition()
        self.error: StoreError | None = None
        self.started = False
        if not num_layers:
            finish()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._left == 0

    def run_layer(self, i: int) -> None:
        """Move layer ``i`` (on a mover thread); a failure fails the whole promotion."""
        moved = False
        if self.error is None:
            try:
                self._move(i)
                moved = True
            except Exception as exc:
                with self._cond:
                    if self.error is None:
                        self.error = StoreError(f"promoting chunk {self.key}: layer {i} failed: {exc}")
                        self.error.__cause__ = exc
        with self._cond:
            self._moved[i], self._done[i] = moved, True
            self._left -= 1
            last = self._left == 0
            self._cond.notify_all()
        if last:
            self._finish()

    def wait(self, i: int) -> None:
        """Return once layer ``i`` is in the pool; StoreError if it will never be."""
        with self._cond:
            self._cond.wait_for(lambda: self._done[i])
            if not self._moved[i]:
                assert self.error is not None
                raise self.error

    def wait_finished(self) -> StoreError | None:
        """Wait until every layer is done; the promotion's error, if it failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._left == 0)
            return self.error


class Loading:
    """The promotions one request waits for, layer by layer (see the module docstring)."""

    def __init__(self, movers: ThreadPoolExecutor, num_layers: int) -> None:
        self._movers, self.num_layers = movers, num_layers
        self.promotions: list[Promotion] = []

    def add(self, p: Promotion) -> None:
        self.promotions.append(p)

    def start(self) -> None:
        """Queue the layers of every promotion not queued yet: layer-major, so layer 0 of
        every chunk is ready first."""
        new = [p for p in self.promotions if not p.started]
        for p in new:
            p.started = True
        if new:
            for i in range(self.num_layers):
                self._movers.submit(_run_layer, new, i)

    def wait(self, layer: int) -> None:
        """Before a layer's attention: every chunk's ``layer`` is in the pool, or StoreError."""
        self.start()
        for p in self.promotions:
            p.wait(layer)

    def wait_all(self) -> None:
        """Every layer of every chunk is in the pool, or StoreError."""
        self.start()
        for p in self.promotions:
            error = p.wait_finished()
            if error is not None:
                raise error


def _run_layer(promotions: list[Promotion], i: int) -> None:
    for p in promotions:
        p.run_layer(i)
