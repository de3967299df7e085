"""kvfuse.rag's text API on the trained SmolLM2-135M-Instruct: the prompt is the chat
template's, ``full`` is HF ``generate`` token for token, stored documents computed after
the system preamble reproduce full prefill exactly where they must, the store counts are
the plan's, and scores are HF's own log-likelihoods."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
import kvfuse.hf
from kvfuse import InvalidValueError
from kvfuse.rag import SYSTEM, RagPipeline, correct, deviation, qa_set


@pytest.fixture(scope="module")
def rag(smollm2: tuple[Any, Any]) -> RagPipeline:
    model, tok = smollm2
    return RagPipeline(model, tok, store=kvfuse.hf.make_store(model, num_pages=256), device="cpu")


def _hf_generate(model: Any, ids: list[int], n: int) -> list[int]:
    model.set_attn_implementation("sdpa")
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_prompt_is_the_chat_template_with_documents_in_order(rag: RagPipeline) -> None:
    q = qa_set(1, seed=3, docs=4)[0]
    p = rag.prompt(q.docs, q.question)
    content = SYSTEM + "\n\n" + "".join(d.strip() + "\n\n" for d in q.docs)
    messages = [{"role": "system", "content": content}, {"role": "user", "content": q.question}]
    text = rag.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rag.tokenizer.decode(p.ids) == text
    assert p.ids == [t for c in p.chunks for t in c] + p.tail and len(p.chunks) == 5
    # a document's chunk does not depend on its neighbours or its place
    assert rag.prompt(q.docs[::-1], q.question).docs == p.docs[::-1]


def test_full_mode_is_hf_generate_token_for_token(rag: RagPipeline) -> None:
    for q in qa_set(2, seed=5, docs=3):
        a = rag.answer(q.docs, q.question, mode="full", max_new_tokens=12)
        assert a.prompt_ids == rag.prompt(q.docs, q.question).ids
        assert a.token_ids == _hf_generate(rag.model, a.prompt_ids, 12)
        assert a.text == rag.tokenizer.decode(a.token_ids, skip_special_tokens=True).strip()
        assert a.ttft_s > 0 and a.mode == "full"


def test_one_document_stored_after_the_preamble_is_full_prefill(rag: RagPipeline) -> None:
    """A document computed after the system preamble, reused right after it, is exactly
    what full prefill computes; computed alone from position 0 it is not (its first token
    becomes a sink of its own)."""
    q = qa_set(1, seed=7, docs=1)[0]
    full = rag.answer(q.docs, q.question, mode="full", max_new_tokens=10)
    reuse = rag.answer(q.docs, q.question, mode="reuse", max_new_tokens=10)
    assert reuse.token_ids == full.token_ids
    p = rag.prompt(q.docs, q.question)
    with rag._state(p, "full", 0) as (c, seen, _), torch.no_grad():
        want = rag.model(torch.tensor([p.ids]), cache=c, use_cache=True).logits[0, -1]
    logits = {}
    for in_context in (True, False):
        pipe = RagPipeline(rag.model, rag.tokenizer, store=rag.store, device="cpu", in_context=in_context)
        with pipe._state(p, "reuse", 0) as (c, seen, _), torch.no_grad():
            logits[in_context] = pipe.model(torch.tensor([p.ids[seen:]]), cache=c, use_cache=True).logits[0, -1]
    assert deviation(want, logits[True])[0] < 1e-3
    assert deviation(want, logits[False])[1] > 100 * max(deviation(want, logits[True])[1], 1e-9)


def test_store_counts_and_blend_at_ratio_one(rag: RagPipeline) -> None:
    q = qa_set(1, seed=11, docs=3)[0]
    fresh = RagPipeline(rag.model, rag.tokenizer, store=kvfuse.hf.make_store(rag.model, num_pages=128), device="cpu")
    first = fresh.answer(q.docs, q.question, mode="reuse", max_new_tokens=4)
    assert (first.hits, first.misses) == (0, 4)  # the preamble and three documents, computed and stored
    assert fresh.ingest(q.docs) == 0 and fresh.ingest([*q.docs, "One more document."]) == 1
    rag.ingest(q.docs)
    again = rag.answer(q.docs[::-1], q.question, mode="blend", ratio=0.15, max_new_tokens=4)
    assert (again.hits, again.misses) == (4, 0) and again.recomputed >= 1
    full = rag.answer(q.docs, q.question, mode="full", max_new_tokens=8)
    assert rag.answer(q.docs, q.question, mode="blend", ratio=1.0, max_new_tokens=8).token_ids == full.token_ids


def test_score_is_hf_log_likelihood(rag: RagPipeline) -> None:
    q = qa_set(1, seed=13, docs=2)[0]
    p = rag.prompt(q.docs, q.question)
    gold = rag.tokenizer(q.answer, add_special_tokens=False)["input_ids"]
    rag.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logp = torch.log_softmax(rag.model(torch.tensor([p.ids + gold])).logits[0].double(), -1)
    want = sum(float(logp[len(p.ids) - 1 + j, t]) for j, t in enumerate(gold))
    assert rag.score(q.docs, q.question, q.answer, mode="full") == pytest.approx(want, abs=1e-3)
    assert rag.score(q.docs, q.question, q.answer, mode="blend", ratio=1.0) == pytest.approx(want, abs=1e-3)


def test_bad_input_names_the_argument(rag: RagPipeline) -> None:
    q = qa_set(1, seed=1, docs=2)[0]
    for kwargs, name in (
        ({"mode": "fast"}, "mode"),
        ({"docs": "one string"}, "docs"),
        ({"question": "  "}, "question"),
    ):
        args = {"docs": q.docs, "question": q.question} | kwargs
        with pytest.raises(InvalidValueError) as err:
            rag.answer(**args)
        assert err.value.argument == name
    with pytest.raises(InvalidValueError):
        RagPipeline(rag.model, rag.store)  # the store passed where the tokenizer goes


def test_qa_set_is_seeded_and_states_each_fact_once() -> None:
    a, b = qa_set(9, seed=2), qa_set(9, seed=2)
    assert a == b and a != qa_set(9, seed=3)
    assert [q.kind for q in a].count("two-fact") == 3
    for q in a:
        assert len(q.docs) == 6 and len(set(q.docs)) == 6
        for i in q.needed:  # what a question needs is among its documents, once
            assert sum(q.docs[i] == d for d in q.docs) == 1
        assert any(q.answer in q.docs[i] for i in q.needed)
        assert q.subject in q.question and sum(d.startswith(q.subject + " ") for d in q.docs) == 1
    assert correct("It was founded by Ilsa Marwen.", "Ilsa Marwen")
    assert not correct("It was founded by Ilsa Marwenko.", "Ilsa Marwen")
