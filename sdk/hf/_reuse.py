"""Stored chunks on HF models: prefill each chunk once into a ``TieredStore`` (KV
un-rotated, so it serves any position), then answer with ``generate`` over the stored
chunks at their new positions, feeding only the question (full reuse)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from kvfuse.hf._cache import PagedCache
from kvfuse.hf._enable import settings
from kvfuse.hf._paged import PAGE_SIZE
from kvfuse.store import KVPool, Namespace, Plan, TieredStore, plan


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


def fill_misses(model: Any, store: TieredStore, p: Plan, chunks: Sequence[Sequence[int]]) -> None:
    """Compute each chunk the plan missed alone, at positions 0..n-1, into the pages the
    plan lent for it, and commit it (pinned for the plan until it closes)."""
    for i in p.misses:
        with PagedCache(model, store=store) as cache, torch.no_grad():
            cache.rows.adopt(p.pages[i])
            model(torch.tensor([list(chunks[i])], device=cache.rows.device), cache=cache, use_cache=True)
            cache.rows.take(0)  # the pages stay the plan's
        p.commit(i)


def ingest(model: Any, store: TieredStore, chunks: Sequence[Sequence[int]]) -> int:
    """Prefill every chunk that is not stored yet, alone at positions 0..n-1, and store
    it; returns how many were computed."""
    done = 0
    for chunk in chunks:
        with plan(store, [chunk], live_tokens=0) as p:
            fill_misses(model, store, p, [chunk])
            done += len(p.misses)
    return done


def generate_with_chunks(
    model: Any, store: TieredStore, chunks: Sequence[Sequence[int]], question: Sequence[int], **generate_kwargs: Any
) -> torch.Tensor:
    """``model.generate`` on the prompt ``chunks + question`` (token ids) where the chunks'
    KV comes from the store (computed there first if missing), placed at their positions
    in this prompt; only the question is prefilled. Returns generate's output ids
    ``[1, prompt + new]``."""
    with plan(store, chunks, live_tokens=0) as p:
        fill_misses(model, store, p, chunks)
        prefix = list(zip(p.pages, p.lengths, p.positions))
        ids = torch.tensor([[t for c in chunks for t in c] + list(question)], device=store.pool.device)
        with PagedCache(model, store=store, prefix=prefix) as cache:
            out: torch.Tensor = model.generate(ids, cache=cache, **generate_kwargs)
    return out
