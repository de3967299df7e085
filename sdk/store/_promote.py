"""Promotions: a chunk's layers moving from the host or disk tier into its device pages on
the store's mover threads, layer by layer.

A request that passes a :class:`Loading` to the store gets its hits' pages at once and
calls ``loading.wait(i)`` before layer ``i``'s attention reads them: layer 0 computes
while later layers are still on their way (LMCache retrieves layer by layer too). A
chunk moves in steps of layers (:func:`promotion_steps`: 1, 1, 2, 4, ...; from the host,
at least 1 MiB a step after the first); the two movers take the steps of all of a
request's chunks in order of their first layer, so layer 0 of every chunk is ready
first, and one mover reads or checks while the other does. Host steps of one range move
together, one call per mover (:func:`run_batch`). Host chunks that move whole (a cpu
pool) move when the request's loading starts, on its thread, all in one call.

A layer is ready only once it is in the pool and, when it came from the disk, its
checksum matched. A layer that fails fails its promotion: layers not started yet are not moved
(the other mover may finish the one it has), and ``wait`` on any layer that was not
moved raises :class:`StoreError` — it never returns with wrong KV. The store then drops
the chunk (a miss for the next request; its pages come back when the failed request lets
go of them).
"""

from __future__ import annotations

import contextlib
import functools
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
def _mover_stream(device: torch.device, after: list[Any]) -> Iterator[None]:
    """Copies queued inside run on this thread's own CUDA stream on ``device``, after each
    event in ``after`` that is not None (the kernels that may still read the pages, queued
    before they were handed out); they have finished when the block ends. On the
    default stream they would queue behind the model's kernels, and waiting for them
    would wait for those too."""
    streams: dict[torch.device, Any] = _local.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    stream = streams[device]
    for event in after:
        if event is not None:
            stream.wait_event(event)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:  # even after an error: nothing may still be copying from a buffer that is reused
        stream.synchronize()


STEP_BYTES = 1 << 20  # the least a step after layer 0 moves: below it, each step's fixed cost in Python dominates


def promotion_steps(num_layers: int, layer_bytes: int = 0) -> list[range]:
    """Layers per step of a promotion: layer 0 alone (as soon as possible), then 1, 2, 4,
    8, ... layers, but at least :data:`STEP_BYTES` of K and V per step (``layer_bytes``
    a layer): fewer, larger moves (one copy per run of pages, or one sequential read,
    covers a step's layers). A request over 90 chunks of 45 tokens took 540 steps of
    1-14 layers (each 70 KB a layer in SmolLM2's shape), bound by their cost in Python;
    it now takes 270."""
    least = -(-STEP_BYTES // layer_bytes) if layer_bytes > 0 else 1
    steps, at, size = [range(min(1, num_layers))] if num_layers else [], 1, 1
    while at < num_layers:
        steps.append(range(at, min(num_layers, at + max(size, least))))
        at, size = steps[-1].stop, 2 * size
    return steps


Batch = tuple[Callable[[list[Any], range], None], Any]


class Promotion:
    """One chunk's layers moving into its pages, in ``steps`` (ranges of layers);
    ``move(step)`` copies one step's layers. With ``batch`` (a mover of many chunks'
    steps, and this chunk's item for it), steps of one range whose promotions share that
    mover are moved together by :func:`run_batch`; ``move`` then defaults to the mover
    called with this item alone. An ``inline`` promotion runs on the thread that starts
    it, not on the movers (a host chunk moved whole into a cpu pool, on that thread's
    OpenMP team)."""

    def __init__(
        self,
        key: str,
        steps: list[range],
        move: Callable[[range], None] | None,
        finish: Callable[[], None],
        source: str,
        *,
        batch: Batch | None = None,
        inline: bool = False,
    ) -> None:
        if move is None:
            assert batch is not None, "a promotion needs move or batch"
            move = functools.partial(_move_alone, batch)
        self.key, self.source, self.steps, self.batch, self.inline = key, source, steps, batch, inline
        self._move, self._finish = move, finish
        self._step_of = [i for i, r in enumerate(steps) for _ in r]
        self._moved = [False] * len(steps)
        self._done = [False] * len(steps)
        self._left = len(steps)
        self._over = False  # every step done and ``finish`` has returned
        self._cond = threading.Condition()
        self.error: StoreError | None = None
        self.started = False
        if not steps:
            finish()
            self._over = True

    @property
    def finished(self) -> bool:
        """Every step is done and the promotion's ``finish`` has run."""
        with self._cond:
            return self._over

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
                if self.inline:
                    self.run_step(i)
                else:
                    movers.submit(self.run_step, i)

    def run_step(self, i: int) -> None:
        """Move step ``i`` (on a mover thread); a failure fails the whole promotion."""
        error: Exception | None = None
        if self.error is None:
            try:
                self._move(self.steps[i])
            except Exception as exc:
                error = exc
            self.settle(i, error is None, error)
        else:
            self.settle(i, False)

    def settle(self, i: int, moved: bool, error: Exception | None = None) -> None:
        """Step ``i`` is over: ``moved``, or not (failed with ``error``, which then fails
        the whole promotion, or skipped after an earlier failure)."""
        with self._cond:
            if error is not None and self.error is None:
                r = self.steps[i]
                self.error = StoreError(f"promoting chunk {self.key} (layers {r.start}-{r.stop - 1}): {error}")
                self.error.__cause__ = error
            self._moved[i], self._done[i] = moved, True
            self._left -= 1
            last = self._left == 0
            self._cond.notify_all()
        if last:
            try:
                self._finish()
            finally:
                with self._cond:
                    self._over = True
                    self._cond.notify_all()

    def wait(self, layer: int) -> None:
        """Return once ``layer`` is in the pool; StoreError if it will never be."""
        i = self._step_of[layer]
        with self._cond:
            self._cond.wait_for(lambda: self._done[i])
            if not self._moved[i]:
                assert self.error is not None
                raise self.error

    def wait_finished(self) -> StoreError | None:
        """Wait until the promotion is :attr:`finished`; its error, if it failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._over)
            return self.error


def _move_alone(batch: Batch, layers: range) -> None:
    mover, item = batch
    mover([item], layers)


def _same_mover(a: Promotion, b: Promotion) -> bool:
    return a.batch is not None and b.batch is not None and a.batch[0] is b.batch[0]


def run_batch(members: list[tuple[Promotion, int]]) -> None:
    """Step ``i`` of each ``(promotion, i)``, one range of layers, promotions that share a
    batch mover: moved in one call (on a mover thread). A failure fails each promotion
    that was in it; a promotion failed before is skipped."""
    live = [(p, i) for p, i in members if p.error is None]
    error: Exception | None = None
    if live:
        p0, i0 = live[0]
        assert p0.batch is not None
        try:
            p0.batch[0]([p.batch[1] for p, _ in live if p.batch is not None], p0.steps[i0])
        except Exception as exc:
            error = exc
    moving = {id(p) for p, _ in live}
    for p, i in members:
        p.settle(i, id(p) in moving and error is None, error if id(p) in moving else None)


class Loading:
    """The promotions one request waits for, layer by layer (see the module docstring)."""

    def __init__(self, movers: ThreadPoolExecutor, parts: int = 2) -> None:
        self._movers, self._parts = movers, parts
        self.promotions: list[Promotion] = []
        self._ready: set[int] = set()  # layers known in the pool for every promotion (decode steps skip the checks)
        self._pending = False  # some promotion may still move

    def add(self, p: Promotion) -> None:
        self.promotions.append(p)
        self._ready.clear()
        self._pending = True

    def start(self) -> None:
        """Queue the steps of every promotion not queued yet, by first layer: layer 0 of
        every chunk is ready first. Steps of one range whose promotions share a batch
        mover go as one task per mover (``parts``), each one call: 90 chunks' layer 0
        is two copies, not 90 tasks. Inline promotions run first, here, one call per
        batch mover and range."""
        new = [p for p in self.promotions if p.claim()]
        inline = [(p, i) for p in new if p.inline for i in range(len(p.steps))]
        tasks = sorted(
            (r.start, r.stop, p.batch is None, n, i)
            for n, p in enumerate(new)
            if not p.inline
            for i, r in enumerate(p.steps)
        )
        group: list[tuple[Promotion, int]] = []

        def flush(parts: int) -> None:
            for j in range(parts):
                part = group[len(group) * j // parts : len(group) * (j + 1) // parts]
                if part and part[0][0].inline:
                    run_batch(part)
                elif part:
                    self._movers.submit(run_batch, part)
            group.clear()

        def joins(p: Promotion, i: int) -> bool:
            """Step ``i`` of ``p`` goes in the group's call: the same mover and layers."""
            q, j = group[0] if group else (p, i)
            return _same_mover(q, p) and q.steps[j] == p.steps[i] and q.inline == p.inline

        for p, i in inline:  # first, here: one call per batch mover and range
            if not joins(p, i):
                flush(1)
            if p.batch is None:
                p.run_step(i)
            else:
                group.append((p, i))
        flush(1)
        for *_, n, i in tasks:
            p = new[n]
            if not joins(p, i):
                flush(self._parts)
            if p.batch is None:
                self._movers.submit(p.run_step, i)
            else:
                group.append((p, i))
        flush(self._parts)

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
    pool: KVPool,
    chunks: list[tuple[list[int], torch.Tensor, torch.Tensor, Any]],
    layers: range,
    *,
    team: bool = False,
) -> None:
    """A step of host chunks, each ``(pages, k, v, after)``: their ``layers`` into their
    pages (:meth:`KVPool.write_many`: one pass over a host pool, on the calling thread's
    OpenMP team with ``team``, else on that thread alone, as a mover beside the other
    should; on a GPU, one ``copy_`` per run on the mover's stream, after every chunk's
    ``after``: :meth:`KVPool.fence`).

    k, v: [num_layers, pages * page_size, num_kv_heads, head_dim] (a padded host copy)
    """
    if all(k.shape[0] == len(layers) for _, k, _, _ in chunks):  # whole chunks
        parts = [(pages, k, v) for pages, k, v, _ in chunks]
    else:
        parts = [(pages, k[layers.start : layers.stop], v[layers.start : layers.stop]) for pages, k, v, _ in chunks]
    if pool.device.type != "cuda":
        pool.write_many(parts, layers, team=team)
        return
    with _mover_stream(pool.device, [after for *_, after in chunks]):  # done means done: host copies are reused
        pool.write_many(parts, layers)


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
            with _mover_stream(pool.device, [after]):  # the stage is reused by the next layer
                pool.write(pages, pair[0:1, :n], pair[1:2, :n], range(i, i + 1))
    except ChunkRejected:
        disk.reject(reader.key)
        raise
    except OSError:
        disk.errors += 1
        raise
