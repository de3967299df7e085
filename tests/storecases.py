"""Shared data of the store tests: one small namespace, seeded chunks, bit equality."""

from __future__ import annotations

import torch
from kvfuse.store import Namespace

NS = Namespace(model_id="tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bf16", page_size=4)


def chunk(seed: int, tokens: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (K, V) of one chunk of ``tokens`` tokens in NS's layout, bf16."""
    g = torch.Generator().manual_seed(seed)
    shape = NS.chunk_shape(tokens)
    return torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(shape, generator=g).to(torch.bfloat16)


def same_bits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))
