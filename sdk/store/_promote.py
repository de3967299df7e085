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


def promotion_steps(num_layers: int) -> list[range]:
    """Layers per step of a promotion: 1, 1, 2, 4, 8, ... — layer 0 as soon as possible,
    then fewer, larger moves (one ``copy_`` per run of pages, or one sequential read, covers
    a step's layers)."""
    steps, at, size = [], 0, 1
    while at < num_layers:
        steps.append(range(at, min(num_layers, at + size)))
        at += size
        size = size if len(steps) == 1 else 2 * size
    return steps


class Promotion:
    """One chunk's layers moving into its pages, in ``steps`` (ranges of layers);
    ``move(step)`` copies one step's layers."""

    def __init__(
        self, key: str, steps: list[range], move: Callable[[range], None], finish: Callable[[], None], source: str
    ) -> None:
        self.key, self.source, self.steps = key, source, steps
        self._move, self._finish = move, finish
        self._step_of = [i for i, r in enumerate(steps) for _ in r]
        self._moved = [False] * len(steps)
        self._done = [False] * len(steps)
        self._left = len(steps)
        self._cond = threading.Condition()
        self.error: StoreError | None = None
        self.started = False
        if not steps:
            finish()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._left == 0

    def start(self, movers: ThreadPoolExecutor) -> None:
        """Queue every step (once; for one promotion alone, e.g. one whose request ended
        before it started its loading)."""
        with self._cond:
            if self.started:
                return
            self.started = True
        for i in range(len(self.steps)):
            movers.submit(self.run_step, i)

    def run_step(self, i: int) -> None:
        """Move step ``i`` (on a mover thread); a failure fails the whole promotion."""
        moved = False
        if self.error is None:
            try:
                self._move(self.steps[i])
                moved = True
            except Exception as exc:
                with self._cond:
                    if self.error is None:
                        r = self.steps[i]
                        self.error = StoreError(f"promoting chunk {self.key} (layers {r.start}-{r.stop - 1}): {exc}")
                        self.error.__cause__ = exc
        with self._cond:
            self._moved[i], self._done[i] = moved, True
            self._left -= 1
            last = self._left == 0
            self._cond.notify_all()
        if last:
            self._finish()

    def wait(self, layer: int) -> None:
        """Return once ``layer`` is in the pool; StoreError if it will never be."""
        i = self._step_of[layer]
        with self._cond:
            self._cond.wait_for(lambda: self._done[i])
            if not self._moved[i]:
                assert self.error is not None
                raise self.error

    def wait_finished(self) -> StoreError | None:
        """Wait until every step is done; the promotion's error, if it failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._left == 0)
            return self.error


class Loading:
    """The promotions one request waits for, layer by layer (see the module docstring)."""

    def __init__(self, movers: ThreadPoolExecutor) -> None:
        self._movers = movers
        self.promotions: list[Promotion] = []

    def add(self, p: Promotion) -> None:
        self.promotions.append(p)

    def start(self) -> None:
        """Queue the steps of every promotion not queued yet, by first layer: layer 0 of
        every chunk is ready first."""
        new = []
        for p in self.promotions:
            with p._cond:
                if not p.started:
                    p.started = True
                    new.append(p)
        tasks = sorted((r.start, n, i) for n, p in enumerate(new) for i, r in enumerate(p.steps))
        for _, n, i in tasks:
            self._movers.submit(new[n].run_step, i)

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
