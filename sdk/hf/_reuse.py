"""Stored chunks on HF models: prefill each chunk once into a ``TieredStore`` (KV
un-rotated, so it serves any position), then answer with ``generate`` over the stored
chunks at their new positions, feeding only the question (full reuse)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from kvfuse.hf._cache import PagedCache
from kvfuse.hf._enable import settings
from kvfuse.hf._paged import PAGE_SIZE
from kvfuse.store import KVPool, Loading, Namespace, Plan, TieredStore, chunk_key, plan


def namespace(model: Any, model_id: str | None = None) -> Namespace:
    """The store namespace of ``model``'s KV: layers, kv heads, head_dim, dtype, pages
    and its RoPE table (so a scaled RoPE never shares KV with an unscaled one)."""
    s = settings(model)
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[next(model.parameters()).dtype]
    name = model_id or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return Namespace(
        model_id=name,
        num_layers=int(model.config.num_hidden_layers),
        num_kv_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        dtype=dtype,
        page_size=PAGE_SIZE,
        rope=s.rope.model_dump_json() if s.rope is not None else "",
    )


def make_store(model: Any, num_pages: int, **kwargs: Any) -> TieredStore:
    """A ``TieredStore`` for ``model``'s KV with a device pool of ``num_pages`` pages on
    the model's device; ``kwargs`` as ``TieredStore`` (host_bytes, disk_dir, ...)."""
    ns = namespace(model)
    return TieredStore(ns, KVPool(ns, num_pages, device=next(model.parameters()).device), **kwargs)


def chunk_keys(store: TieredStore, chunks: Sequence[Sequence[int]], after: int | None = None) -> list[str]:
    """Keys of ``chunks`` in ``store``; with ``after``, every chunk but that one is keyed as
    computed after it (``chunk_key(..., context=chunks[after])``)."""
    ctx = list(chunks[after]) if after is not None else None
    return [chunk_key(store.namespace, list(c), None if i == after else ctx) for i, c in enumerate(chunks)]


def fill_misses(
    model: Any, store: TieredStore, p: Plan, chunks: Sequence[Sequence[int]], after: int | None = None
) -> None:
    """Compute each chunk the plan missed into the pages the plan lent for it, and commit
    it (pinned for the plan until it closes). Alone at positions 0..n-1; or, with
    ``after``, right after chunk ``after`` (a prefix computed alone at 0, e.g. the system
    prompt), attending to it as it will in every prompt: the stored KV is then computed in
    context, and no chunk's first token becomes an attention sink of its own."""
    todo = sorted(p.misses, key=lambda i: i != after)  # the context first
    for i in todo:
        prefix = [] if after is None or i == after else [(p.pages[after], p.lengths[after], 0)]
        with PagedCache(model, store=store, prefix=prefix) as cache, torch.no_grad():
            cache.rows.adopt(p.pages[i])
            ids = torch.tensor([list(chunks[i])], device=cache.rows.device)
            model(ids, cache=cache, use_cache=True)
            cache.rows.take(0)  # the pages stay the plan's
        p.commit(i)


def ingest(model: Any, store: TieredStore, chunks: Sequence[Sequence[int]], after: int | None = None) -> int:
    """Prefill every chunk that is not stored yet (alone at positions 0..n-1, or after
    chunk ``after`` as :func:`fill_misses`) and store it, one chunk at a time (only the
    context stays pinned meanwhile); returns how many chunks were computed."""
    keys = chunk_keys(store, chunks, after)
    done = 0
    for i in range(len(chunks)):
        idx = [i] if after is None or i == after else [after, i]
        with plan(store, [chunks[j] for j in idx], live_tokens=0, keys=[keys[j] for j in idx]) as p:
            fill_misses(model, store, p, [chunks[j] for j in idx], None if len(idx) == 1 else 0)
            done += sum(1 for m in p.misses if idx[m] == i)
    return done


def generate_with_chunks(
    model: Any,
    store: TieredStore,
    chunks: Sequence[Sequence[int]],
    question: Sequence[int],
    after: int | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` on the prompt ``chunks + question`` (token ids) where the chunks'
    KV comes from the store (computed there first if missing, as :func:`fill_misses`),
    placed at their positions in this prompt; only the question is prefilled. Returns
    generate's output ids ``[1, prompt + new]``."""
    with reused(model, store, chunks, after) as (cache, _):
        ids = torch.tensor([[t for c in chunks for t in c] + list(question)], device=store.pool.device)
        out: torch.Tensor = model.generate(ids, cache=cache, **generate_kwargs)
    return out


class SharedCores:
    """``PagedCache.ready`` for a request whose stored chunks still move into a cpu pool:
    while they move, torch's intra-op threads leave the store's movers their cores, and
    get them back at the first layer after the last promotion is done.

    A forward on all the cores, beside movers that read, verify and copy, runs far slower
    than the sum of the two: every parallel op waits at its barrier for the thread that
    lost its core. Measured on the 2-core VM, 4k-token SmolLM2 reuse with every chunk on
    disk (190 MB of KV), seven runs each: median TTFT 0.34 s on two threads against
    0.30 s on one while the chunks move (the device tier: 0.21 s)."""

    def __init__(self, loading: Loading, movers: int) -> None:
        self.loading = loading
        self.full = torch.get_num_threads()
        self.lent = max(1, self.full - movers)
        self.sharing = False

    def share(self) -> None:
        """Give the movers their cores if promotions are still moving."""
        if self.lent < self.full and self.loading.pending:
            torch.set_num_threads(self.lent)
            self.sharing = True

    def __call__(self, layer: int) -> None:
        """Wait for ``layer`` (``Loading.wait``); all the cores back once nothing moves."""
        self.loading.wait(layer)
        if self.sharing and not self.loading.pending:
            self.restore()

    def restore(self) -> None:
        if self.sharing:
            torch.set_num_threads(self.full)
            self.sharing = False


@contextlib.contextmanager
def _cores(store: TieredStore, loading: Loading | None) -> Iterator[Callable[[int], None] | None]:
    """The ready callback of a request's cache (see :class:`SharedCores`), threads
    restored however the request ends."""
    if loading is None:
        yield None
        return
    if store.pool.device.type != "cpu":
        yield loading.wait
        return
    cores = SharedCores(loading, store.movers)
    cores.share()
    try:
        yield cores
    finally:
        cores.restore()


@contextlib.contextmanager
def reused(
    model: Any,
    store: TieredStore,
    chunks: Sequence[Sequence[int]],
    after: int | None = None,
    split: tuple[str, str] | None = None,
    layerwise: bool = True,
) -> Iterator[tuple[PagedCache, Plan]]:
    """A ``PagedCache`` holding the stored KV of ``chunks`` at their positions in the
    prompt (filled first where missing), and the plan that pins it, for the block
    (``split``: as ``PagedCache``). ``layerwise``: chunks promoted from the host or disk
    tier move layer by layer while the model runs; each layer's attention waits only for
    its own layer (a promotion that fails raises ``StoreError`` there)."""
    loading = store.loading() if layerwise else None
    with plan(store, chunks, live_tokens=0, keys=chunk_keys(store, chunks, after), loading=loading) as p:
        if p.misses and loading is not None:
            loading.wait_all()  # the misses are computed after their stored context
        fill_misses(model, store, p, chunks, after)
        prefix = list(zip(p.pages, p.lengths, p.positions))
        with PagedCache(model, store=store, prefix=prefix, split=split) as cache, _cores(store, loading) as ready:
            cache.ready = ready
            yield cache, p
