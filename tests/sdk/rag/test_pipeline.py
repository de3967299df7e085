"""The RAG pipeline's modes against full prefill, on a transformers Llama run by kvfuse:
exact where they must be, closer with blend."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
import kvfuse.hf
from kvfuse.rag import RagPipeline, deviation


@pytest.fixture(scope="module")
def setup() -> tuple[RagPipeline, list[list[int]], list[int]]:
    cfg = transformers.LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = kvfuse.hf.enable(transformers.LlamaForCausalLM(cfg).eval(), device="cpu")
    pipe = RagPipeline(model, store=kvfuse.hf.make_store(model, num_pages=256))
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (40, 17, 64)]
    question = torch.randint(0, 200, (8,), generator=g).tolist()
    assert pipe.ingest(chunks) == 3 and pipe.ingest(chunks) == 0  # stored once
    return pipe, chunks, question


def test_one_stored_chunk_reused_equals_full_prefill(setup: tuple[RagPipeline, list[list[int]], list[int]]) -> None:
    pipe, chunks, question = setup
    full, reuse = pipe.full(chunks[:1], question), pipe.reuse(chunks[:1], question)
    assert reuse.hits == 1 and reuse.misses == 0
    assert deviation(full.logits, reuse.logits)[0] < 1e-4


def test_blend_recomputing_everything_equals_full_prefill(
    setup: tuple[RagPipeline, list[list[int]], list[int]],
) -> None:
    pipe, chunks, question = setup
    assert deviation(pipe.full(chunks, question).logits, pipe.blend(chunks, question, 1.0).logits)[0] < 1e-4


def test_blend_deviates_less_than_reuse(setup: tuple[RagPipeline, list[list[int]], list[int]]) -> None:
    pipe, chunks, question = setup
    full = pipe.full(chunks, question)
    reuse, blend = pipe.reuse(chunks, question), pipe.blend(chunks, question, 0.15)
    kl_reuse, kl_blend = deviation(full.logits, reuse.logits)[1], deviation(full.logits, blend.logits)[1]
    assert kl_reuse > 1e-5  # chunks prefilled alone do differ
    assert kl_blend < kl_reuse
    assert blend.recomputed == -(-121 * 15 // 100)  # ceil(0.15 * 121) context tokens


def test_heterogeneous_split_equals_one_device(setup: tuple[RagPipeline, list[list[int]], list[int]]) -> None:
    """Stored segments on cpu (OpenVINO), the live question on npu (ONNX Runtime), merged."""
    pipe, chunks, question = setup
    single = pipe.reuse(chunks, question)
    split = pipe.reuse(chunks, question, split=("cpu", "npu"))
    assert deviation(single.logits, split.logits)[0] < 1e-4


def test_misses_are_filled_and_stored(setup: tuple[RagPipeline, list[list[int]], list[int]]) -> None:
    pipe, _, question = setup
    new = [list(range(30))]
    first = pipe.reuse(new, question)
    assert first.misses == 1 and pipe.store.tier(pipe.keys(new)[0]) == "device"
    assert pipe.reuse(new, question).hits == 1


def test_answers_are_generated_from_each_modes_kv(setup: tuple[RagPipeline, list[list[int]], list[int]]) -> None:
    """Decoding continues from the reused or blended KV with generate; full and blend at
    ratio 1 decode the same tokens, and every mode's first new token is its argmax."""
    pipe, chunks, question = setup
    kw = {"max_new_tokens": 6, "do_sample": False}
    full = pipe.generate(chunks, question, "full", **kw)
    assert torch.equal(pipe.generate(chunks, question, "blend", ratio=1.0, **kw), full)
    prompt = sum(len(c) for c in chunks) + len(question)
    for mode, answer in (("reuse", pipe.reuse(chunks, question)), ("blend", pipe.blend(chunks, question, 0.15))):
        out = pipe.generate(chunks, question, mode, **kw)
        assert out.shape == (1, prompt + 6) and int(out[0, prompt]) == int(answer.logits.argmax())
    with pytest.raises(ValueError, match="mode"):
        pipe.generate(chunks, question, "fast")
