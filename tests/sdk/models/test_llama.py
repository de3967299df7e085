"""The kvfuse Llama matches transformers' own forward on the same weights."""

from __future__ import annotations

import kvfuse
import pytest
import torch
from kvfuse.models import LlamaConfig, LlamaModel
from kvfuse.store import KVPool

transformers = pytest.importorskip("transformers")

CFG = LlamaConfig(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=500.0,
    max_position=256,
)


@pytest.mark.parametrize("device", ["reference", "cpu", "npu"])
def test_logits_match_transformers_full_prefill(device: str) -> None:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(CFG.hf_config()).eval()
    model = LlamaModel.from_hf_state_dict(CFG, hf.state_dict(), device=device)
    pool = KVPool(CFG.namespace("t", page_size=16), num_pages=8)
    tokens = torch.randint(0, 100, (37,))
    pages = pool.alloc(3)
    assert pages is not None
    table = kvfuse.SegmentTable.from_lists([[(pages, 37, 0)]])
    hidden = model.forward(tokens, torch.arange(37, dtype=torch.int32), pool, table, pool.slots(pages, 37))
    ours = model.logits(hidden)
    with torch.no_grad():
        theirs = hf(tokens[None]).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
