"""Promotions: a chunk's layers moving from the host or disk tier into its device pages on
the store's mover threads, layer by layer.

A request that passes a :class:`Loading` to the store gets its hits' pages at once and
calls ``loading.wait(i)`` before layer ``i``'s attention reads them: layer 0 computes
while later layers are still on their way (LMCache retrieves layer by layer too). A
chunk moves in steps of layers (:func:`promotion_steps`: 1, 1, 2, 4, ...); the two
movers take the steps of all of a request's chunks in order of their first layer, so
layer 0 of every chunk is ready first, and one mover reads or checks while the other
does.

A layer is ready only once it is in the pool and, when it came from the disk, its
checksum matched. A layer that fails fails its promotion: layers not started yet are not moved
(the other mover may finish the one it has), and ``wait`` on any layer that was not
moved raises :class:`StoreError` — it never returns with wrong KV. The store then drops
the chunk (a miss for the next request; its pages come back when the failed request lets
go of them).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from kvfuse._errors import StoreError
from kvfuse.store._disk import ChunkReader, ChunkRejected, DiskTier
from kvfuse.store._pool import KVPool, bytes_of

_local = threading.local()


@contextlib.contextmanager
def _mover_stream(device: torch.device, after: Any) -> Iterator[None]:
    """Copies queued inside run on this thread's own CUDA stream on ``device``, after the
    event ``after`` (the kernels that may still read the pages, queued before they were
    handed out); they have finished when the block ends. On the default stream they would
    queue behind the model's kernels, and waiting for them would wait for those too."""
    streams: dict[torch.device, Any] = _local.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    stream = streams[device]
    if after is not None:
        stream.wait_event(after)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:  # even after an error: nothing may still be copying from a buffer that is reused
        stream.synchronize()


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

    def claim(self) -> bool:
        """True for the one caller that gets to queue this promotion's steps."""
        with self._cond:
            first, self.started = not self.started, True
            return first

    def start(self, movers: ThreadPoolExecutor) -> None:
        """Queue every step (once; for one promotion alone, e.g. one whose request ended
        before it started its loading)."""
        if self.claim():
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
        self._ready: set[int] = set()  # layers known in the pool for every promotion (decode steps skip the checks)
        self._pending = False  # some promotion may still move

    def add(self, p: Promotion) -> None:
        self.promotions.append(p)
        self._ready.clear()
        self._pending = True

    def start(self) -> None:
        """Queue the steps of every promotion not queued yet, by first layer: layer 0 of
        every chunk is ready first."""
        new = [p for p in self.promotions if p.claim()]
        tasks = sorted((r.start, n, i) for n, p in enumerate(new) for i, r in enumerate(p.steps))
        for _, n, i in tasks:
            self._movers.submit(new[n].run_step, i)

    @property
    def pending(self) -> bool:
        """Some promotion still moves (or has not started)."""
        if self._pending:
            self._pending = any(not p.finished for p in self.promotions)
        return self._pending

    def wait(self, layer: int) -> None:
        """Before a layer's attention: every chunk's ``layer`` is in the pool, or StoreError."""
        if layer in self._ready:
            return
        self.start()
        for p in self.promotions:
            p.wait(layer)
        self._ready.add(layer)

    def wait_all(self) -> None:
        """Every layer of every chunk is in the pool, or StoreError."""
        self.start()
        for p in self.promotions:
            error = p.wait_finished()
            if error is not None:
                raise error


def move_from_host(
    pool: KVPool, pages: list[int], k: torch.Tensor, v: torch.Tensor, layers: range, *, after: Any = None
) -> None:
    """A step of a host chunk: its ``layers`` into ``pages``, one ``copy_`` per page run
    (on a GPU, on the mover's stream after ``after``: :meth:`KVPool.fence`).

    k, v: [num_layers, pages * page_size, num_kv_heads, head_dim] (a padded host copy)
    """
    ks, vs = k[layers.start : layers.stop], v[layers.start : layers.stop]
    if pool.device.type != "cuda":
        pool.write(pages, ks, vs, layers, team=False)  # the other mover copies beside this one
        return
    with _mover_stream(pool.device, after):  # done means done: the host copy is reused after the last step
        pool.write(pages, ks, vs, layers)


def move_from_disk(
    pool: KVPool,
    disk: DiskTier,
    reader: ChunkReader,
    pages: list[int],
    stage: Any,
    layers: range,
    *,
    after: Any = None,
) -> None:
    """A step of a disk chunk: its ``layers`` read in one go and verified, straight into
    the pool's pages (cpu), or a layer at a time through this thread's pinned staging
    pair (``stage``: a ``threading.local``), copied on the mover's stream after ``after``.
    A rejected file is counted and quarantined."""
    ns = pool.namespace
    n = reader.num_tokens
    try:
        if pool.device.type == "cpu":
            into = pool.byte_ranges(pages, n, layers)
            reader.read_layers(layers, [k for k, _ in into], [v for _, v in into])
            return
        pair = getattr(stage, "pair", None)
        if pair is None or pair.shape[1] < n:
            shape = (2, max(n, 1024), ns.num_kv_heads, ns.head_dim)
            pair = stage.pair = torch.empty(shape, dtype=ns.torch_dtype, pin_memory=True)
        for i in layers:
            reader.read_layer(i, [bytes_of(pair[0, :n])], [bytes_of(pair[1, :n])])
            with _mover_stream(pool.device, after):  # the stage is reused by the next layer
                pool.write(pages, pair[0:1, :n], pair[1:2, :n], range(i, i + 1))
    except ChunkRejected:
        disk.reject(reader.key)
        raise
    except OSError:
        disk.errors += 1
        raise
