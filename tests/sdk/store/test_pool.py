"""KVPool.write's host copy (``copy_into``): bit-exact, only the given pages, and torch's
own ``copy_`` wherever numpy's would not be the same operation."""

from __future__ import annotations

import pytest
import torch
from kvfuse.store import KVPool
from kvfuse.store._pool import copy_into
from storecases import NS


def _random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Every bit pattern possible, NaN payloads and signalling NaNs included."""
    g = torch.Generator().manual_seed(seed)
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * width), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_copy_into_a_strided_view_is_bit_exact_and_touches_nothing_else(dtype: torch.dtype) -> None:
    pool = _random_bits((4, 10, 3, 8), dtype, seed=1)  # [layers, tokens, heads, dim]
    before = pool.clone()
    src = _random_bits((4, 5, 3, 8), dtype, seed=2)
    dst = pool[:, 2:7]  # layer-strided, rows contiguous: numpy's path
    copy_into(dst, src)
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))
    rest = torch.ones(10, dtype=torch.bool)
    rest[2:7] = False
    assert torch.equal(pool[:, rest].view(torch.uint8), before[:, rest].view(torch.uint8))


def test_host_copy_into_converts_dtypes_and_follows_any_strides_as_copy_does() -> None:
    src = torch.randn(4, 5, 3, 8)
    for dst, s in (
        (torch.empty(4, 5, 3, 8, dtype=torch.bfloat16), src),  # another dtype: converted
        (torch.empty(4, 5, 8, 3), src.transpose(2, 3)),  # rows not contiguous in src
        (torch.empty(8, 3, 5, 4).permute(3, 2, 1, 0), src),  # nor in dst
    ):
        want = torch.empty_like(dst).copy_(s)
        copy_into(dst, s)
        assert torch.equal(dst.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


def test_pool_write_places_each_run_of_pages_bit_exact() -> None:
    pool = KVPool(NS, num_pages=8)
    shape = (NS.num_layers, 3 * NS.page_size - 1, NS.num_kv_heads, NS.head_dim)  # the last page part-full
    k, v = _random_bits(shape, NS.torch_dtype, 3), _random_bits(shape, NS.torch_dtype, 4)
    pages = [5, 6, 1]  # two runs
    pool.write(pages, k, v)
    for t, pages_of in ((k, pool.k), (v, pool.v)):
        got = pages_of[:, pages].flatten(1, 2)[:, : shape[1]]
        assert torch.equal(got.contiguous().view(torch.uint8), t.view(torch.uint8))
    untouched = [p for p in range(8) if p not in pages]
    assert not pool.k[:, untouched].any() and not pool.v[:, untouched].any()
