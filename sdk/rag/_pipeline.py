"""The RAG pipeline on any transformers decoder run by kvfuse (``kvfuse.hf.enable``).

Text in, text out::

    rag = RagPipeline(model, tokenizer)          # a default TieredStore, automatic device
    rag.ingest(docs)                             # each document prefilled and stored once
    a = rag.answer(docs, question, mode="blend", ratio=0.15, max_new_tokens=32)

The prompt is the model's chat template with the documents in the system message
(``kvfuse.rag._prompt``). Its chunks are the system preamble (``head``, computed alone at
position 0: exact, as in full prefill) and one per document. By default (``in_context``)
each document is prefilled right after the head, as in every prompt, and stored under a key
that names the head: a document prefilled alone from position 0 would make its first token
an attention sink of its own, which later queries then over-attend when the chunk is
reused mid-prompt. ``lead`` tokens at the start of each document are always recomputed in
blend mode (EPIC's fix for the same effect). Modes:

(a) ``full``: prefill of the whole prompt (exactly HF ``generate`` on ``prompt_ids``);
(b) ``reuse``: the stored chunks at their new positions, only the tail prefilled;
(c) ``blend``: CacheBlend (``kvfuse.hf.blended``): layer 0 recomputed for every token,
    the ``ratio`` of document tokens whose layer-1 keys deviate most, and the tail,
    recomputed in the later layers.

The token-level methods (``full``, ``reuse``, ``blend``, ``generate`` over token chunks)
remain for callers that build prompts themselves (the random-weight benchmark).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kvfuse._errors import InvalidValueError
from kvfuse.hf import PagedCache, blend_generate, generate_with_chunks, ingest
from kvfuse.hf._blend import blended
from kvfuse.hf._reuse import chunk_keys, reused
from kvfuse.rag._prompt import SYSTEM, Prompt, build_prompt
from kvfuse.store import TieredStore

MODES = ("full", "reuse", "blend")


@dataclass
class Answer:
    """One answered question. ``token_ids`` are the new tokens; ``prompt_ids`` the whole
    prompt as full prefill sees it; ``ttft_s`` the time to the first new token (store
    lookups, misses' prefill and blending included)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    ttft_s: float
    mode: str
    decode_tok_s: float = 0.0  # new tokens per second after the first
    hits: int = 0  # chunks (the system preamble and each document) found in the store
    misses: int = 0  # chunks prefilled and stored by this call
    recomputed: int = 0  # document tokens recomputed beyond layer 0 (blend)


@dataclass
class Prefill:
    """A token-level prefill: the next-token logits and its time.

    logits: [vocab_size], fp32
    """

    logits: torch.Tensor
    seconds: float
    hits: int = 0
    misses: int = 0
    recomputed: int = 0


def deviation(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, KL(p_reference || p_other)) of next-token distributions."""
    lp, lq = torch.log_softmax(reference.double(), -1), torch.log_softmax(other.double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum())
    return float((reference - other).abs().max()), kl


def _check_mode(mode: object) -> None:
    if mode not in MODES:
        raise InvalidValueError("mode", "'full', 'reuse' or 'blend'", mode)


def default_pages(model: Any) -> int:
    """Device-pool pages for the model's longest prompt three times over: its documents
    (pinned while a request reads them; each chunk rounds up to whole pages), blend's
    scratch copy of the prompt, and the answer's own pages."""
    positions = int(getattr(model.config, "max_position_embeddings", 8192))
    return 3 * (positions // 16) + 256


class Clock:
    """A ``generate`` streamer that notes when the first and the last new token arrive."""

    def __init__(self) -> None:
        self.calls, self.first, self.last = 0, 0.0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        now = time.perf_counter()
        if self.calls == 2:  # the first put is the prompt
            self.first = now
        self.last = now

    def end(self) -> None:
        pass

    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (0 if there was one token)."""
        n = self.calls - 2
        return n / (self.last - self.first) if n > 0 and self.last > self.first else 0.0


class RagPipeline:
    """``model``: a transformers decoder (kvfuse is enabled on it, on ``device``);
    ``tokenizer``: its tokenizer (for the text API); ``store``: a ``TieredStore`` of its KV
    (default: ``kvfuse.hf.make_store`` with room for the model's longest prompt);
    ``layerwise``: stored chunks found on the host or disk tier move into the device pool
    layer by layer while the model computes (False: whole, before it starts)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        store: TieredStore | None = None,
        device: str | None = None,
        *,
        system: str = SYSTEM,
        in_context: bool = True,
        lead: int = 0,
        layerwise: bool = True,
    ) -> None:
        import kvfuse.hf

        if isinstance(tokenizer, TieredStore):
            raise InvalidValueError("tokenizer", "a tokenizer (pass the store as store=)", "a TieredStore")
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.system, self.in_context, self.lead = system, bool(in_context), int(lead)
        self.layerwise = bool(layerwise)
        self._enable()
        if store is None:
            store = kvfuse.hf.make_store(model, num_pages=default_pages(model))
        self.store = store
        self.pool = store.pool

    def _enable(self) -> None:
        """kvfuse attention on the model (again, if the caller switched it to another)."""
        from kvfuse.hf import enable
        from kvfuse.hf._enable import NAME

        on = getattr(self.model.config, "_attn_implementation", None) == NAME
        if not on or (self.device is not None and getattr(self.model, "_kvfuse_device", None) != self.device):
            enable(self.model, device=self.device)

    # -- text in, text out ---------------------------------------------------------------

    def prompt(self, docs: Sequence[str], question: str) -> Prompt:
        """The chat-template prompt of ``question`` over ``docs``, in chunks."""
        if self.tokenizer is None:
            raise InvalidValueError("tokenizer", "a tokenizer (RagPipeline(model, tokenizer))", None)
        return build_prompt(self.tokenizer, docs, question, self.system)

    def ingest(self, docs: Sequence[str] | Sequence[Sequence[int]]) -> int:
        """Prefill and store every document (text) or token chunk not stored yet; returns
        how many were computed. Documents are prefilled after the system preamble
        (``in_context``), token chunks alone at positions 0..n-1."""
        self._enable()
        if docs and all(isinstance(d, str) for d in docs):
            p = self.prompt([str(d) for d in docs], "?")
            ingest(self.model, self.store, [p.head])  # the preamble first: the count is of documents
            return ingest(self.model, self.store, p.chunks, 0 if self.in_context else None)
        return ingest(self.model, self.store, [[int(t) for t in c] for c in docs])

    def answer(
        self, docs: Sequence[str], question: str, mode: str = "blend", ratio: float = 0.15, max_new_tokens: int = 32
    ) -> Answer:
        """Answer ``question`` from ``docs`` (greedy) with the KV of ``mode``."""
        p = self.prompt(docs, question)
        start = time.perf_counter()
        clock = Clock()
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "streamer": clock}
        with self._state(p, mode, ratio) as (cache, _, info):
            ids = torch.tensor([p.ids], device=self.pool.device)
            out = self.model.generate(ids, cache=cache, **kw)
        new = out[0, len(p.ids) :].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Answer(text, new, p.ids, clock.first - start, mode, clock.decode_tok_s(), **info)

    def score(self, docs: Sequence[str], question: str, gold: str, mode: str = "full", ratio: float = 0.15) -> float:
        """log p(gold | prompt) under the KV of ``mode``: the gold answer's tokens, teacher-forced."""
        p = self.prompt(docs, question)
        target = list(self.tokenizer(gold, add_special_tokens=False)["input_ids"])
        with self._state(p, mode, ratio) as (cache, seen, _), torch.no_grad():
            feed = p.ids[seen:] + target
            logits = self.model(torch.tensor([feed], device=self.pool.device), cache=cache, use_cache=True).logits
        logp = torch.log_softmax(logits[0].double(), -1)
        first = len(p.ids) - seen - 1  # the logits that predict target[0]
        return float(sum(logp[first + j, t] for j, t in enumerate(target)))

    @contextlib.contextmanager
    def _state(self, p: Prompt, mode: str, ratio: float) -> Iterator[tuple[PagedCache, int, dict[str, int]]]:
        """A cache holding ``mode``'s KV of the prompt's first ``seen`` tokens (generate
        and forward feed the rest), and the store counts."""
        _check_mode(mode)
        self._enable()
        after = 0 if self.in_context else None
        if mode == "full":
            with PagedCache(self.model) as cache:
                yield cache, 0, {}
        elif mode == "reuse":
            with reused(self.model, self.store, p.chunks, after, layerwise=self.layerwise) as (cache, plan):
                yield cache, cache.seen(), {"hits": len(plan.hits), "misses": len(plan.misses)}
        else:
            with blended(self.model, self.store, p.chunks, p.tail, ratio, after, self.lead) as b:
                with PagedCache(self.model, store=self.store, prefix=b.prefix) as cache:
                    yield cache, cache.seen(), {"hits": b.hits, "misses": b.misses, "recomputed": b.recomputed}

    def keys(self, chunks: Sequence[Sequence[int]], after: int | None = None) -> list[str]:
        """Store keys of token chunks (see ``kvfuse.hf`` ``chunk_keys``)."""
        return chunk_keys(self.store, chunks, after)

    # -- token level ---------------------------------------------------------------------

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], dtype=torch.int64, device=self.pool.device)

    def full(self, chunks: Sequence[Sequence[int]], question: Sequence[int]) -> Prefill:
        start = time.perf_counter()
        with PagedCache(self.model) as cache, torch.no_grad():
            ids = [t for c in chunks for t in c] + list(question)
            logits = self.model(self._ids(ids), cache=cache, use_cache=True).logits[0, -1].float()
        return Prefill(logits, time.perf_counter() - start)

    def reuse(
        self, chunks: Sequence[Sequence[int]], question: Sequence[int], split: tuple[str, str] | None = None
    ) -> Prefill:
        start = time.perf_counter()
        with reused(self.model, self.store, chunks, None, split) as (cache, p), torch.no_grad():
            logits = self.model(self._ids(question), cache=cache, use_cache=True).logits[0, -1].float()
        return Prefill(logits, time.perf_counter() - start, len(p.hits), len(p.misses))

    def blend(self, chunks: Sequence[Sequence[int]], question: Sequence[int], ratio: float = 0.15) -> Prefill:
        start = time.perf_counter()
        with blended(self.model, self.store, chunks, question, ratio) as b:
            logits = b.logits
        return Prefill(logits, time.perf_counter() - start, b.hits, b.misses, b.recomputed)

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
        _check_mode(mode)
        ids = self._ids([t for c in chunks for t in c] + list(question))
        with PagedCache(self.model) as cache:
            out: torch.Tensor = self.model.generate(ids, cache=cache, **generate_kwargs)
        return out
