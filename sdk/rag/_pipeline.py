"""The RAG pipeline. Chunks are prefilled once, alone, at positions 0..n-1, and stored
(keys un-rotated, so they serve any position). A question is answered by:

(a) ``full``: prefill of every chunk token and the question (the baseline);
(b) ``reuse``: the stored chunks as segments at their new positions + the live question;
(c) ``blend``: CacheBlend-style — layer 0 is recomputed for every token, the tokens whose
    layer-1 keys deviate most from the stored ones are selected (``blend_select``), and the
    later layers recompute only those, as queries at their true positions over the stored
    KV with the selected tokens' KV replaced (so the mask is exact).

``split=(stored_device, live_device)`` computes, in reuse mode, the attention over the
stored segments on one device and over the live segment on another, merged with
``merge_states``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import kvfuse
import torch
from kvfuse.models import LlamaModel
from kvfuse.ops import SegmentTable
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
    def __init__(self, model: LlamaModel, store: TieredStore) -> None:
        self.model = model
        self.store = store
        self.pool = store.pool

    def _tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.int64, device=self.pool.device)

    def _positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, dtype=torch.int32, device=self.pool.device)

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, chunks: Sequence[Sequence[int]]) -> int:
        """Prefill and store every chunk not stored yet (each alone, at positions 0..n-1)."""
        done = 0
        for chunk in chunks:
            with plan(self.store, [chunk], live_tokens=0) as p:
                if p.misses:
                    self._fill(p, 0, chunk)
                    done += 1
        return done

    def _fill(self, p: kvfuse.store.Plan, i: int, chunk: Sequence[int]) -> None:
        n = len(chunk)
        table = SegmentTable.from_lists([[(p.pages[i], n, 0)]], device=self.pool.device)
        self.model.forward(self._tokens(chunk), self._positions(0, n), self.pool, table, self.pool.slots(p.pages[i], n))
        p.commit(i)

    # -- (a) full prefill -----------------------------------------------------------------------

    def full(self, chunks: Sequence[Sequence[int]], question: Sequence[int]) -> Answer:
        start = time.perf_counter()
        tokens = [t for c in chunks for t in c] + list(question)
        pages = self.store.allocate(len(tokens))
        try:
            table = SegmentTable.from_lists([[(pages, len(tokens), 0)]], device=self.pool.device)
            x = self.model.forward(
                self._tokens(tokens),
                self._positions(0, len(tokens)),
                self.pool,
                table,
                self.pool.slots(pages, len(tokens)),
            )
            logits = self.model.logits(x[-1:])[0]
        finally:
            self.store.release(pages)
        return Answer(logits, time.perf_counter() - start)

    # -- (b) full reuse ---------------------------------------------------------------------------

    def reuse(
        self, chunks: Sequence[Sequence[int]], question: Sequence[int], split: tuple[str, str] | None = None
    ) -> Answer:
        start = time.perf_counter()
        with plan(self.store, chunks, live_tokens=len(question)) as p:
            for i in p.misses:
                self._fill(p, i, chunks[i])
            m, pool = self.model, self.pool
            pos, slots = p.live_positions(), p.live_slots()
            whole = p.segments()
            parts = (p.segments(live=False), p.segments(stored=False)) if split else None
            x = m.embed(self._tokens(question))
            for layer in range(m.config.num_layers):
                q, k, v = m.qkv(layer, x)
                k_pages, v_pages = pool.layer(layer)
                kvfuse.append_kv(k, v, k_pages, v_pages, slots, device=m.device)
                if parts is None or split is None:
                    attn = m.attend(layer, q, pos, pool, whole)
                else:
                    attn = self._split_attend(q, pos, k_pages, v_pages, parts, split)
                x = m.finish(layer, x, attn)
            logits = m.logits(x[-1:])[0]
            return Answer(logits, time.perf_counter() - start, len(p.hits), len(p.misses))

    def _split_attend(
        self,
        q: torch.Tensor,
        pos: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        parts: tuple[SegmentTable, SegmentTable],
        devices: tuple[str, str],
    ) -> torch.Tensor:
        q_indptr = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        states = [
            kvfuse.fusion_attention(q, q_indptr, pos, k_pages, v_pages, table, rope=self.model.rope, device=dev)
            for table, dev in zip(parts, devices)
        ]
        out, _ = kvfuse.merge_states(states, device=devices[0])
        return out

    # -- (c) CacheBlend-style selective recompute --------------------------------------------------

    def blend(self, chunks: Sequence[Sequence[int]], question: Sequence[int], ratio: float = 0.15) -> Answer:
        start = time.perf_counter()
        m, pool = self.model, self.pool
        with plan(self.store, chunks, live_tokens=len(question)) as p:
            for i in p.misses:
                self._fill(p, i, chunks[i])
            n_ctx = sum(p.lengths)
            total = n_ctx + len(question)
            # scratch pages mirroring each chunk's, plus the question's (the plan's live pages)
            scratch: list[list[int]] = []
            try:
                for n in p.lengths:
                    scratch.append(self.store.allocate(n))
                segs = [(s, n, pos) for s, n, pos in zip(scratch, p.lengths, p.positions)]
                segs.append((p.live_pages, p.live_len, p.live_pos))
                table = SegmentTable.from_lists([segs], device=pool.device)
                all_slots = torch.cat([pool.slots(s, n) for s, n in zip(scratch, p.lengths)] + [p.live_slots()])
                positions = self._positions(0, total)
                src_ids = torch.tensor([x for pg in p.pages for x in pg], dtype=torch.int32)
                dst_ids = torch.tensor([x for pg in scratch for x in pg], dtype=torch.int32)
                stored_slots = torch.cat([pool.slots(pg, n) for pg, n in zip(p.pages, p.lengths)])
                # layer 0: every token
                x = m.embed(self._tokens([t for c in chunks for t in c] + list(question)))
                q, k, v = m.qkv(0, x)
                kvfuse.append_kv(k, v, *pool.layer(0), all_slots, device=m.device)
                x = m.finish(0, x, m.attend(0, q, positions, pool, table))
                # layer 1: fresh keys of every token against the stored ones → the tokens to recompute
                q, k, v = m.qkv(1, x)
                k_stored = pool.layer(1)[0].reshape(-1, *k.shape[1:])[stored_slots]
                always = torch.arange(n_ctx, total, device=pool.device)
                chosen = kvfuse.blend_select(k_stored, k[:n_ctx], ratio, device=m.device)
                sel = torch.cat([chosen.to(pool.device), always])
                for layer in range(1, m.config.num_layers):
                    if layer > 1:
                        q, k, v = m.qkv(layer, x)
                    elif sel.numel() != total:
                        q, k, v, x = q[sel], k[sel], v[sel], x[sel]
                    k_pages, v_pages = pool.layer(layer)
                    # stored KV of every chunk, with the selected tokens' KV replaced
                    kvfuse.copy_pages(k_pages, v_pages, src_ids, k_pages, v_pages, dst_ids, device=m.device)
                    kvfuse.append_kv(k, v, k_pages, v_pages, all_slots[sel], device=m.device)
                    x = m.finish(layer, x, m.attend(layer, q, positions[sel], pool, table))
                logits = m.logits(x[-1:])[0]
            finally:
                self.store.release([x for s in scratch for x in s])
            return Answer(logits, time.perf_counter() - start, len(p.hits), len(p.misses), int(chosen.numel()))

    def keys(self, chunks: Sequence[Sequence[int]]) -> list[str]:
        return [chunk_key(self.store.namespace, list(c)) for c in chunks]
