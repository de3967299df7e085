"""The RAG pipeline on any transformers decoder run by kvfuse (``kvfuse.hf.enable``).
Chunks are prefilled once, alone, at positions 0..n-1, and stored (keys un-rotated, so
they serve any position). A question is answered by:

(a) ``full``: prefill of every chunk token and the question (the baseline);
(b) ``reuse``: the stored chunks as segments at their new positions + the live question;
(c) ``blend``: CacheBlend (``kvfuse.hf.blended``) — layer 0 recomputed for every token,
    the tokens whose layer-1 keys deviate most from the stored ones and the question
    recomputed in the later layers, over exact positions.

``split=(stored_device, live_device)`` computes, in reuse mode, the attention over the
stored segments on one device and over the live segment on another, merged with
``merge_states``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kvfuse._errors import InvalidValueError
from kvfuse.hf import PagedCache, blend_generate, generate_with_chunks, ingest
from kvfuse.hf._blend import blended
from kvfuse.hf._reuse import fill_misses
from kvfuse.store import TieredStore, chunk_key, plan


@dataclass
class Answer:
    logits: torch.Tensor  # [vocab_size], fp32: next-token logits after the question
    seconds: float  # time to first token
    hits: int = 0
    misses: int = 0
    recomputed: int = 0  # tokens recomputed beyond the question (blend)


def deviation(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, KL(p_reference || p_other)) of next-token distributions."""
    lp, lq = torch.log_softmax(reference.double(), -1), torch.log_softmax(other.double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum())
    return float((reference - other).abs().max()), kl


class RagPipeline:
    """``model``: a transformers decoder with ``kvfuse.hf.enable`` applied; ``store``: a
    ``TieredStore`` of its KV (``kvfuse.hf.make_store(model, num_pages)``)."""

    def __init__(self, model: Any, store: TieredStore) -> None:
        self.model = model
        self.store = store
        self.pool = store.pool

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], dtype=torch.int64, device=self.pool.device)

    def keys(self, chunks: Sequence[Sequence[int]]) -> list[str]:
        return [chunk_key(self.store.namespace, list(c)) for c in chunks]

    def ingest(self, chunks: Sequence[Sequence[int]]) -> int:
        """Prefill and store every chunk not stored yet (each alone, at positions 0..n-1)."""
        return ingest(self.model, self.store, chunks)

    def full(self, chunks: Sequence[Sequence[int]], question: Sequence[int]) -> Answer:
        start = time.perf_counter()
        with PagedCache(self.model) as cache, torch.no_grad():
            ids = [t for c in chunks for t in c] + list(question)
            logits = self.model(self._ids(ids), cache=cache, use_cache=True).logits[0, -1].float()
        return Answer(logits, time.perf_counter() - start)

    def reuse(
        self, chunks: Sequence[Sequence[int]], question: Sequence[int], split: tuple[str, str] | None = None
    ) -> Answer:
        start = time.perf_counter()
        with plan(self.store, chunks, live_tokens=0) as p, torch.no_grad():
            fill_misses(self.model, self.store, p, chunks)
            prefix = list(zip(p.pages, p.lengths, p.positions))
            with PagedCache(self.model, store=self.store, prefix=prefix, split=split) as cache:
                logits = self.model(self._ids(question), cache=cache, use_cache=True).logits[0, -1].float()
        return Answer(logits, time.perf_counter() - start, len(p.hits), len(p.misses))

    def blend(self, chunks: Sequence[Sequence[int]], question: Sequence[int], ratio: float = 0.15) -> Answer:
        start = time.perf_counter()
        with blended(self.model, self.store, chunks, question, ratio) as b:
            logits = b.logits
        return Answer(logits, time.perf_counter() - start, recomputed=b.recomputed)

    def generate(
        self,
        chunks: Sequence[Sequence[int]],
        question: Sequence[int],
        mode: str = "reuse",
        ratio: float = 0.15,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """The answer, decoded by ``model.generate`` from the KV of ``mode`` ("full",
        "reuse" or "blend"): output ids ``[1, prompt + new]``."""
        if mode == "reuse":
            return generate_with_chunks(self.model, self.store, chunks, question, **generate_kwargs)
        if mode == "blend":
            return blend_generate(self.model, self.store, chunks, question, ratio, **generate_kwargs)[0]
        if mode != "full":
            raise InvalidValueError("mode", "'full', 'reuse' or 'blend'", mode)
        ids = self._ids([t for c in chunks for t in c] + list(question))
        with PagedCache(self.model) as cache:
            out: torch.Tensor = self.model.generate(ids, cache=cache, **generate_kwargs)
        return out
