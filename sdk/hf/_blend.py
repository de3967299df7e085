"""CacheBlend on any transformers decoder, through the common decoder layout only
(``model.model.embed_tokens``, ``rotary_emb``, ``layers``, ``norm``, ``model.lm_head``):

1. the prompt's stored chunks are copied into scratch pages beside the question's;
2. layer 0 is recomputed for every token;
3. layer 1's attention (not its MLP) runs once as a probe: kvfuse's attention function
   collects its fresh keys (whatever the projection: bias, q/k norm), and
   ``blend_select`` picks the tokens whose keys deviate most from the stored ones, plus
   the question;
4. layers 1.. recompute only those tokens, as queries at their true positions over every
   token's KV, theirs replaced (so the mask is exact);
5. ``generate`` continues from the blended KV.

With ``ratio=1.0`` every token is recomputed: the result is full prefill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from kvfuse._errors import InvalidValueError
from kvfuse.hf._cache import PagedCache
from kvfuse.hf._paged import PAGE_SIZE, Step
from kvfuse.hf._reuse import chunk_keys, fill_misses
from kvfuse.ops import append_kv, blend_select
from kvfuse.store import TieredStore, plan


@dataclass
class Blended:
    """A blended prompt: the last token's logits, how many context tokens were recomputed
    beyond layer 0, and the prefix (``PagedCache(prefix=...)``) of every prompt token but
    the last, in scratch pages that live until the ``blended`` block ends.

    logits: [vocab_size], fp32
    """

    logits: torch.Tensor
    recomputed: int
    prefix: list[tuple[list[int], int, int]]
    ids: list[int]
    hits: int = 0  # chunks found in the store
    misses: int = 0  # chunks computed and stored first


@contextlib.contextmanager
def blended(
    model: Any,
    store: TieredStore,
    chunks: Sequence[Sequence[int]],
    question: Sequence[int],
    ratio: float,
    after: int | None = None,
    lead: int = 0,
) -> Iterator[Blended]:
    """Blend ``chunks + question`` (steps 1-4 above); the chunks are stored first if
    missing (alone, or after chunk ``after``: see ``fill_misses``). ``lead``: the first
    ``lead`` tokens of every chunk but ``after`` are always recomputed (EPIC's fix for
    chunks prefilled without their preceding context)."""
    if not question:
        raise InvalidValueError("question", "at least one token (blending decodes after it)", 0)
    inner, device = model.model, store.pool.device
    ids = [t for c in chunks for t in c] + list(question)
    total, n_ctx = len(ids), sum(len(c) for c in chunks)
    keys = chunk_keys(store, chunks, after)
    with plan(store, chunks, 0, keys) as p, PagedCache(model, store=store) as scratch, torch.no_grad():
        fill_misses(model, store, p, chunks, after)
        rows = scratch.rows
        positions = torch.arange(total, device=device)
        full: Step = rows.step(torch.ones(1, total, dtype=torch.bool, device=device), positions[None])
        if n_ctx:  # 1. the stored KV, copied beside the question's
            stored = torch.cat([store.pool.slots(pg, n) for pg, n in zip(p.pages, p.lengths)])
            for layer in range(rows.num_layers):
                k_rows, v_rows = (t[layer].view(-1, *t[layer].shape[2:])[stored] for t in (rows.k, rows.v))
                append_kv(k_rows, v_rows, rows.k[layer], rows.v[layer], full.slots[:n_ctx])
        x = inner.embed_tokens(torch.tensor([ids], device=device))
        pe = inner.rotary_emb(x, positions[None])
        scratch.preset = full
        x = inner.layers[0](x, position_ids=positions[None], position_embeddings=pe, cache=scratch)  # 2.
        chosen = positions
        if len(inner.layers) > 1 and n_ctx:  # 3. the layer-1 probe
            scratch.probe = []
            probe = inner.layers[1]
            if hasattr(probe, "input_layernorm") and hasattr(probe, "self_attn"):  # the keys need no MLP
                h = probe.input_layernorm(x)
                probe.self_attn(
                    h, position_embeddings=pe, attention_mask=None, position_ids=positions[None], cache=scratch
                )
            else:
                probe(x, position_ids=positions[None], position_embeddings=pe, cache=scratch)
            fresh, scratch.probe = scratch.probe[0], None
            k_stored = rows.k[1].view(-1, *rows.k[1].shape[2:])[full.slots[:n_ctx]]
            starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
            leading = [s + t for i, s in enumerate(starts) if i != after for t in range(min(lead, len(chunks[i])))]
            always = torch.tensor(leading, dtype=torch.int64, device=device) if leading else None
            picked = blend_select(
                k_stored, fresh[:n_ctx].to(k_stored.dtype), ratio, always=always, device=scratch.settings.device
            )
            chosen = torch.cat([picked.to(device), torch.arange(n_ctx, total, device=device)])
        sel_pos = positions[chosen]
        scratch.preset = replace(
            full,
            slots=full.slots[chosen],
            q_indptr=torch.tensor([0, chosen.numel()], dtype=torch.int32, device=device),
            q_pos=sel_pos.to(torch.int32),
            plans={},
        )
        x, pe_sel = x[:, chosen], (pe[0][:, chosen], pe[1][:, chosen])
        for layer in inner.layers[1:]:  # 4.
            x = layer(x, position_ids=sel_pos[None], position_embeddings=pe_sel, cache=scratch)
        scratch.preset = None
        logits = model.lm_head(inner.norm(x[:, -1:]))[0, -1].float()
        pages = rows.pages[0][: -(-(total - 1) // PAGE_SIZE)]  # exactly the pages of all but the last token
        recomputed = int(chosen.numel()) - (total - n_ctx)
        yield Blended(logits, recomputed, [(pages, total - 1, 0)], ids, len(p.hits), len(p.misses))


def blend_generate(
    model: Any,
    store: TieredStore,
    chunks: Sequence[Sequence[int]],
    question: Sequence[int],
    ratio: float = 0.15,
    after: int | None = None,
    lead: int = 0,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """``model.generate`` on ``chunks + question`` with the chunks' stored KV blended (5.:
    generate feeds the last prompt token over the blended KV of the others). Returns
    (output ids ``[1, prompt + new]``, context tokens recomputed beyond layer 0)."""
    with blended(model, store, chunks, question, ratio, after, lead) as b:
        with PagedCache(model, store=store, prefix=b.prefix) as cache:
            ids = torch.tensor([b.ids], device=store.pool.device)
            out: torch.Tensor = model.generate(ids, cache=cache, **generate_kwargs)
    return out, b.recomputed
