"""cpu moves: bit copies, as 64-bit words where rows allow and in the tensor's dtype where not."""

from __future__ import annotations

import pytest
import torch
from kvfuse.devices.cpu import moves


def _pool(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits, NaN payloads and negative zeros included."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bfloat16:
        return torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row", [(16, 2, 64), (1, 1, 3)])  # 64-bit words, and 6- or 12-byte rows
def test_moves_are_bit_copies(dtype: torch.dtype, row: tuple[int, ...]) -> None:
    k, v = _pool((40, *row), dtype, 1), _pool((40, *row), dtype, 2)
    assert (moves._words(k) is None) == (row == (1, 1, 3))
    ids = torch.tensor([7, 0, 39, 12], dtype=torch.int32)
    kb, vb = moves.gather_pages(k, v, ids)
    assert torch.equal(kb.view(torch.uint8), k[ids.long()].view(torch.uint8))
    assert torch.equal(vb.view(torch.uint8), v[ids.long()].view(torch.uint8))
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    moves.scatter_pages(kb, vb, dk, dv, ids)
    moves.copy_pages(k, v, ids, dk, dv, ids + 0)  # same pages again, through the staging buffer
    expect = torch.zeros_like(k)
    expect[ids.long()] = k[ids.long()]
    assert torch.equal(dk.view(torch.uint8), expect.view(torch.uint8))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[ids.long()] = False
    assert (dv[untouched].view(torch.uint8) == 0).all()
