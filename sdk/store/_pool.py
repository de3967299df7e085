"""KVPool: the device tier's memory — per-layer paged K/V on one torch device."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from kvfuse._errors import IndexRangeError
from kvfuse.store._keys import Namespace


class KVPool:
    """``k[layer]`` / ``v[layer]``: [num_pages, page_size, num_kv_heads, head_dim], contiguous —
    exactly the pools that :func:`kvfuse.fusion_attention` and :func:`kvfuse.append_kv` take.
    Pages are allocated per chunk and shared by all layers (page p of every layer).

    Chunk copies outside the pool (the host tier, staging) are *padded*: [num_layers,
    pages * page_size, num_kv_heads, head_dim], so each layer of them is whole pages that
    :func:`kvfuse.gather_pages` writes into (``out=``) and that move to the pool as runs of
    consecutive pages, each one ``copy_`` at the memory's speed."""

    def __init__(self, namespace: Namespace, num_pages: int, device: torch.device | str = "cpu") -> None:
        ns = namespace
        shape = (ns.num_layers, num_pages, ns.page_size, ns.num_kv_heads, ns.head_dim)
        self.namespace = ns
        self.num_pages = num_pages
        self.k = torch.zeros(shape, dtype=ns.torch_dtype, device=device)
        self.v = torch.zeros(shape, dtype=ns.torch_dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))
        self._stage: tuple[torch.Tensor, torch.Tensor] | None = None  # reused by read() off the cpu
        self._bytes: tuple[memoryview, ...] | None = None  # K's and V's bytes (cpu), for byte_ranges

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def free_list(self) -> list[int]:
        """The free pages, sorted."""
        return sorted(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.namespace.page_size)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as one page pool each, every layer's pages in a row: what a page
        transport registers (``Transport.register_pool``), to move chunks between
        processes whose pools share this namespace. Page ``p`` of layer ``i`` is flat page
        ``i * num_pages + p`` (:meth:`flat_ids`).

        Returns two [num_layers * num_pages, page_size, num_kv_heads, head_dim] views of
        the pool, the namespace's dtype
        """
        return self.k.view(-1, *self.k.shape[2:]), self.v.view(-1, *self.v.shape[2:])

    def flat_ids(self, pages: list[int]) -> list[int]:
        """The flat pages (:meth:`flat`) of ``pages`` in every layer: layer 0's, then layer 1's, ..."""
        return [i * self.num_pages + p for i in range(self.namespace.num_layers) for p in pages]

    def byte_ranges(self, pages: list[int], num_tokens: int, layers: range) -> list[tuple[list[memoryview], ...]]:
        """The pool's bytes (cpu pools) where ``num_tokens`` tokens laid on ``pages`` sit,
        per layer of ``layers``: (K pieces, V pieces) in token order, one piece per run of
        consecutive pages, writable in place. Byte arithmetic on one view of each pool:
        no tensor is made per piece (a promotion asks for thousands)."""
        if self._bytes is None:
            self._bytes = (bytes_of(self.k), bytes_of(self.v))
        ns = self.namespace
        row = ns.num_kv_heads * ns.head_dim * self.k.element_size()
        page = ns.page_size * row
        spans = [
            (first * page, min(count * ns.page_size, num_tokens - at * ns.page_size) * row)
            for first, count, at in runs(pages)
        ]
        out = []
        for i in layers:
            base = i * self.num_pages * page
            out.append(tuple([b[base + s : base + s + n] for s, n in spans] for b in self._bytes))
        return out

    def slots(self, pages: list[int], num_tokens: int) -> torch.Tensor:
        """slot_mapping of tokens 0..num_tokens-1 laid on ``pages``: [num_tokens], int64."""
        p = self.namespace.page_size
        t = torch.arange(num_tokens)
        return (torch.tensor(pages, dtype=torch.int64)[t // p] * p + t % p).to(self.device)

    def host_buffers(self, num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New padded host copies of ``num_pages`` pages: [num_layers, num_pages * page_size,
        num_kv_heads, head_dim] each, the namespace's dtype (pinned when the pool is on a GPU)."""
        ns = self.namespace
        shape = (ns.num_layers, num_pages * ns.page_size, ns.num_kv_heads, ns.head_dim)
        pin = self.device.type == "cuda"
        return tuple(torch.empty(shape, dtype=ns.torch_dtype, pin_memory=pin) for _ in range(2))  # type: ignore[return-value]

    def fence(self) -> Any:
        """A CUDA event after all that the caller's stream has queued so far (kernels that
        may still read pages just handed out), for copies on another stream to wait for;
        None off CUDA, where every op is done when it returns."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        return event

    def write(
        self, pages: list[int], k: torch.Tensor, v: torch.Tensor, layers: range | None = None, *, team: bool = True
    ) -> None:
        """Write a chunk's K/V into ``pages``: every layer, or those of ``layers``
        (:meth:`write_many` of one chunk).

        k, v: [num_layers (or len(layers)), num_tokens, num_kv_heads, head_dim], padded or
        not, any device
        """
        self.write_many([(pages, k, v)], layers, team=team)

    def write_many(
        self,
        chunks: list[tuple[list[int], torch.Tensor, torch.Tensor]],
        layers: range | None = None,
        *,
        team: bool = True,
    ) -> None:
        """Write chunks' K/V, each ``(pages, k, v)``, into their pages: every layer, or
        those of ``layers``. A host pool takes all their bytes in one pass of the cpu
        device's kernel (one span per layer and run of consecutive pages, split over
        torch's OpenMP team with ``team``: False on threads of many, like the store's
        movers); elsewhere, and for what the kernel does not take, one ``copy_`` per run.

        k, v: [num_layers (or len(layers)), num_tokens, num_kv_heads, head_dim], padded or
        not, any device
        """
        for pages, _, _ in chunks:  # before any byte moves: spans past a layer's pages would land in the next
            if pages and (min(pages) < 0 or max(pages) >= self.num_pages):
                raise IndexRangeError("pages", f"page ids in [0, {self.num_pages})", f"{min(pages)} to {max(pages)}")
        first = 0 if layers is None else layers.start
        if self._write_spans(chunks, first, team):
            return
        ps = self.namespace.page_size
        for pages, k, v in chunks:
            sel = slice(first, first + k.shape[0])
            for start, count, at in runs(pages):
                n = min(count * ps, k.shape[1] - at * ps)
                if n <= 0:
                    break
                for pool, src in ((self.k, k), (self.v, v)):
                    copy_into(pool[sel, start : start + count].flatten(1, 2)[:, :n], src[:, at * ps : at * ps + n])

    def _write_spans(self, chunks: list[tuple[list[int], torch.Tensor, torch.Tensor]], first: int, team: bool) -> bool:
        """:meth:`write_many` by the cpu device's ``copy_spans``, where the pool and every
        chunk's (k, v) are host tensors of its dtype with whole token rows; False where not
        (nothing written)."""
        copy_spans = _spans_kernel()
        pool = self.k
        if copy_spans is None or self.device.type != "cpu":
            return False
        ps, elt, row = self.namespace.page_size, pool.element_size(), pool.stride(2)  # row: a token's elements
        page, token, rows = pool.stride(1) * elt, row * elt, (row, *pool.stride()[3:])
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        k_spans = []  # per chunk: [layers * runs, 4] (pair, dst offset, src offset, length), its K's
        for pages, k, v in chunks:
            n = k.shape[1]
            if not (k.is_cpu and v.is_cpu) or k.dtype != pool.dtype or v.dtype != pool.dtype or k.shape != v.shape:
                return False
            if k.stride() != v.stride() or k.stride()[1:] != rows or k.shape[2:] != pool.shape[3:]:
                return False
            if first + k.shape[0] > pool.shape[0]:
                return False
            pair = len(pairs)
            per_run = [(pair, p * page, at * ps * token, min(c * ps, n - at * ps) * token) for p, c, at in runs(pages)]
            per_layer = _layer_offsets(first, k.shape[0], pool.stride(0) * elt, k.stride(0) * elt)
            per_run_array = np.array(per_run, dtype=np.int64).reshape(1, -1, 4)
            k_spans.append((per_layer[:, None, :] + per_run_array).reshape(-1, 4))
            pairs += [(self.k, k), (self.v, v)]
        spans = np.concatenate(k_spans) if k_spans else np.zeros((0, 4), dtype=np.int64)
        spans = np.concatenate([spans, spans + _V_PAIR])  # V's: the next pair, the same offsets
        return copy_spans(pairs, spans[spans[:, 3] > 0], team=team)

    def read(
        self, pages: list[int], num_tokens: int | None = None, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's K/V from ``pages`` into padded host copies (``out``, or new ones from
        :meth:`host_buffers`), each layer by :func:`kvfuse.gather_pages` with ``out=``:
        straight into the copy on the cpu, through one reused staging pair elsewhere.
        Returns the copies, or their first ``num_tokens`` tokens (views).

        out: two [num_layers, len(pages) * page_size, num_kv_heads, head_dim], the namespace's dtype
        """
        import kvfuse

        k_out, v_out = out if out is not None else self.host_buffers(len(pages))
        ns = self.namespace
        ids = torch.tensor(pages, dtype=torch.int32, device=self.device)
        shape = (len(pages), ns.page_size, ns.num_kv_heads, ns.head_dim)
        for i in range(ns.num_layers):
            into = (k_out[i].view(shape), v_out[i].view(shape))
            if self.device.type != "cpu":
                into = self._staging(len(pages))
            kvfuse.gather_pages(self.k[i], self.v[i], ids, out=into)
            if self.device.type != "cpu":
                k_out[i].view(shape).copy_(into[0])
                v_out[i].view(shape).copy_(into[1])
        if num_tokens is None:
            return k_out, v_out
        return k_out[:, :num_tokens], v_out[:, :num_tokens]

    def _staging(self, num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stage is None or self._stage[0].shape[0] < num_pages:
            size = max(num_pages, 2 * (self._stage[0].shape[0] if self._stage else 0))
            self._stage = (torch.empty_like(self.k[0, :size]), torch.empty_like(self.v[0, :size]))
        return self._stage[0][:num_pages], self._stage[1][:num_pages]


class HostCopies:
    """Padded host copies the host tier gave up, kept for the next demotion so that it
    writes into memory already mapped and a promotion frees nothing (freeing a 22 MB copy
    cost 1.7 ms of unmapping; a fresh one, a page fault per 4 KiB)."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._returned: list[tuple[torch.Tensor, torch.Tensor]] = []  # from any thread (list.append)
        self._spare: list[tuple[torch.Tensor, torch.Tensor]] = []

    def give_back(self, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._returned.append(pair)

    def take(self, num_pages: int, room: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies for ``num_pages`` pages: views of the smallest spare that fits, else new
        ones (:meth:`KVPool.host_buffers`). Returned copies become spares while they fit in
        ``room`` bytes (the host tier's budget left), with the spares kept so far."""
        room -= sum(_nbytes(s) for s in self._spare)
        while self._returned:
            k, v = (t if t._base is None else t._base for t in self._returned.pop())
            if _nbytes((k, v)) <= room:
                self._spare.append((k, v))
                room -= _nbytes((k, v))
        rows = num_pages * self.pool.namespace.page_size
        fits = [i for i, s in enumerate(self._spare) if s[0].shape[1] >= rows]
        if not fits:
            return self.pool.host_buffers(num_pages)
        k, v = self._spare.pop(min(fits, key=lambda i: self._spare[i][0].shape[1]))  # by index: no tensor ==
        return k[:, :rows], v[:, :rows]


def _nbytes(pair: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in pair)


def runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """``pages`` as runs of consecutive pages: (first page, count, index of the first in
    ``pages``); the index times the page size is the run's first token."""
    out: list[tuple[int, int, int]] = []
    for i, p in enumerate(pages):
        if out and out[-1][0] + out[-1][1] == p:
            first, count, at = out[-1]
            out[-1] = (first, count + 1, at)
        else:
            out.append((p, 1, i))
    return out


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous ``t`` on the cpu, writable in place."""
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


_V_PAIR = np.array([1, 0, 0, 0], dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _layer_offsets(first: int, count: int, dst_layer: int, src_layer: int) -> np.ndarray:
    """Each layer's (0, dst, src, 0) byte offsets for :meth:`KVPool._write_spans`: [count, 4], int64."""
    layer = np.arange(count, dtype=np.int64)
    zero = np.zeros_like(layer)
    return np.stack([zero, (first + layer) * dst_layer, layer * src_layer, zero], axis=1)


@functools.cache
def _spans_kernel() -> Callable[..., bool] | None:
    """The cpu device's ``copy_spans`` (rows.c), or None where it was not built. The store
    sits above the devices, so it may call into one; only this host-to-host copy does."""
    try:
        moves = importlib.import_module("kvfuse.devices.cpu.moves")
    except ImportError:
        return None
    kernel: Callable[..., bool] = moves.copy_spans
    return kernel if moves._rows is not None else None


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; between host tensors of one dtype whose rows (last dimension)
    are contiguous, by numpy on the calling thread (the GIL released). torch's ``copy_``
    there runs on its OpenMP threads, which spin for a while after the copy, on the cores
    the store's movers and the transfer engines need next: with 2 cores, layer-wise host →
    pool promotion rose from 60-65 % to 84-87 % of memcpy and the remote tier's get from
    25 to 33-36 % of raw TCP without them.

    dst, src: the same shape, any dtype (the copy converts it, as ``copy_`` does), any device
    """
    if (
        dst.device.type == src.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.dim() > 0
        and dst.stride(-1) == src.stride(-1) == 1
        and dst.shape == src.shape
    ):
        np.copyto(dst.view(torch.uint8).numpy(), src.detach().view(torch.uint8).numpy())
    else:
        dst.copy_(src, non_blocking=True)
