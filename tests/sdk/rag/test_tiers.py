"""Reuse from every tier on the trained SmolLM2-135M-Instruct: documents promoted from host
memory or (layer by layer) from disk give the device tier's answer and score exactly, and
a document whose file was corrupted is a typed error for that request and a recompute for
the next, never a different answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from storecases import corrupt_layer

transformers = pytest.importorskip("transformers")
import kvfuse.hf
from kvfuse import StoreError
from kvfuse.rag import RagPipeline, qa_set


def test_reuse_from_host_and_disk_is_the_device_answer(smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = smollm2
    store = kvfuse.hf.make_store(model, num_pages=256, host_bytes=1 << 30, disk_dir=tmp_path)
    rag = RagPipeline(model, tok, store=store, device="cpu")
    q = qa_set(1, seed=2, docs=3)[0]
    rag.ingest(q.docs)
    keys = rag.keys(rag.prompt(q.docs, q.question).chunks, after=0)
    want = rag.answer(q.docs, q.question, mode="reuse", max_new_tokens=8)
    want_score = rag.score(q.docs, q.question, q.answer, mode="reuse")
    for tier in ("host", "disk"):
        for key in keys:
            store.demote(key, tier)
        assert all(store.tier(k) == tier for k in keys)
        got = rag.answer(q.docs, q.question, mode="reuse", max_new_tokens=8)
        assert got.token_ids == want.token_ids and got.misses == 0, tier
        for key in keys:
            store.demote(key, tier)
        assert rag.score(q.docs, q.question, q.answer, mode="reuse") == want_score, tier

    # a document's file corrupted in layer 17: a typed error for this request (layers 0-16
    # may already have been computed), a recompute for the next one, the same answer
    for key in keys:
        store.demote(key, "disk")
    corrupt_layer(tmp_path / f"{keys[2]}.kv", 17)
    threads = torch.get_num_threads()
    with pytest.raises(StoreError, match="checksum mismatch in layer 17"):
        rag.answer(q.docs, q.question, mode="reuse", max_new_tokens=8)
    assert torch.get_num_threads() == threads  # the cores lent to the movers came back
    store.audit()  # every page owned once, none lost to the failed request
    assert store.tier(keys[2]) is None and store.stats.rejected == 1
    again = rag.answer(q.docs, q.question, mode="reuse", max_new_tokens=8)
    assert again.misses == 1 and again.token_ids == want.token_ids
