"""KVPool.write into a host pool: by the cpu device's span kernel, or by ``copy_into``
without it; bit-exact, only the chunk's token slots, and torch's own ``copy_`` wherever
numpy's would not be the same operation."""

from __future__ import annotations

import kvfuse.store._pool as pool_module
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvfuse import IndexRangeError
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


@pytest.mark.parametrize("write_path", ["spans/team", "spans/one thread", "copy_into"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pool_write_moves_exactly_the_chunks_tokens_on_every_path(write_path: str, data: st.DataObject) -> None:
    """``write_many`` of one to three chunks, on a host pool by the cpu device's span
    kernel (on the caller's OpenMP team, or on its thread alone, as the movers call it),
    or by a copy per run without it. Any pages (runs or not), any token count (the last
    page part-full), all layers or some, from padded host copies or not: the tokens land
    bit-exact in their pages' slots and every other byte of the pool (the last page's
    tail included) is as it was."""
    if write_path != "copy_into" and pool_module._spans_kernel() is None:
        pytest.skip("the cpu device's _rows extension was not built")
    num_pages, ps = 12, NS.page_size
    taken = data.draw(st.lists(st.integers(0, num_pages - 1), min_size=3, max_size=9, unique=True), label="pages")
    cuts = sorted(data.draw(st.lists(st.integers(1, len(taken) - 1), max_size=2, unique=True), label="cuts"))
    first = data.draw(st.integers(0, NS.num_layers - 1), label="first layer")
    layers = range(first, data.draw(st.integers(first + 1, NS.num_layers), label="end layer"))
    pool = KVPool(NS, num_pages=num_pages)
    for t, seed in ((pool.k, 5), (pool.v, 6)):
        t.copy_(_random_bits(tuple(t.shape), NS.torch_dtype, seed))
    want = pool.k.clone(), pool.v.clone()
    chunks = []
    for pages in (taken[a:b] for a, b in zip([0, *cuts], [*cuts, len(taken)])):
        n = data.draw(st.integers(1, len(pages) * ps), label="tokens")
        padded = data.draw(st.booleans(), label="padded")
        shape = (len(layers), len(pages) * ps if padded else n, NS.num_kv_heads, NS.head_dim)
        k, v = _random_bits(shape, NS.torch_dtype, n), _random_bits(shape, NS.torch_dtype, n + 1)
        chunks.append((pages, k[:, :n], v[:, :n]))
        slots = torch.tensor([pages[t // ps] * ps + t % ps for t in range(n)])
        for w, src in zip(want, (k, v)):
            w[layers.start : layers.stop].flatten(1, 2)[:, slots] = src[:, :n]
    with pytest.MonkeyPatch.context() as mp:
        if write_path == "copy_into":
            mp.setattr(pool_module, "_spans_kernel", lambda: None)
        which = None if len(layers) == NS.num_layers else layers
        pool.write_many(chunks, which, team=write_path != "spans/one thread")
    for got, w in zip((pool.k, pool.v), want):
        assert torch.equal(got.view(torch.uint8), w.view(torch.uint8)), write_path


@pytest.mark.parametrize("write_path", ["spans", "copy_into"])
def test_pool_write_refuses_pages_outside_the_pool_before_a_byte_moves(
    write_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page id past the pool would land in the next layer's pages (the kernel's bound is
    the whole pool): refused for every chunk before any is written."""
    if write_path == "copy_into":
        monkeypatch.setattr(pool_module, "_spans_kernel", lambda: None)
    pool = KVPool(NS, num_pages=4)
    shape = (NS.num_layers, NS.page_size, NS.num_kv_heads, NS.head_dim)
    k, v = _random_bits(shape, NS.torch_dtype, 1), _random_bits(shape, NS.torch_dtype, 2)
    for bad in ([4], [-1]):
        with pytest.raises(IndexRangeError, match="pages"):
            pool.write_many([([0], k, v), (bad, k, v)])
        assert not pool.k.any() and not pool.v.any()
    empty = k[:, :0], v[:, :0]
    pool.write_many([([], *empty), ([2], k, v)])  # a chunk of no tokens writes nothing
    assert torch.equal(pool.k[:, 2].view(torch.uint8), k.view(torch.uint8)) and not pool.k[:, [0, 1, 3]].any()
