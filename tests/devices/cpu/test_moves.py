"""cpu moves: bit copies, as 128- or 64-bit words where rows allow and in the tensor's dtype where not;
every move through the C extension on torch's OpenMP team, copy_pages on Python threads
too, and every move through torch alike."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from kvfuse import IndexRangeError
from kvfuse.devices.cpu import moves


def _pool(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits, NaN payloads and negative zeros included."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bfloat16:
        return torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32).view(torch.float32)


WIDTH = {  # (row, dtype) -> the word the rows move as, in bytes
    ((16, 2, 64), torch.float32): 16,
    ((16, 2, 64), torch.bfloat16): 16,
    ((1, 1, 4), torch.bfloat16): 8,
    ((1, 1, 6), torch.float32): 8,
    ((1, 1, 3), torch.float32): 0,
    ((1, 1, 3), torch.bfloat16): 0,
}


@pytest.fixture(params=["rows.c/team", "rows.c/threads", "torch"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """copy_pages through the C extension (split over torch's OpenMP team, or over Python
    threads where it cannot reach one), and through torch's stage as without it."""
    if request.param.startswith("rows.c"):
        if moves._rows is None:
            pytest.skip("the _rows extension was not built (no C compiler or Python headers)")
        if request.param == "rows.c/team" and not moves.TEAM:
            pytest.skip("no OpenMP runtime loaded by torch")
        monkeypatch.setattr(moves, "TEAM", request.param == "rows.c/team")
    else:
        monkeypatch.setattr(moves, "_rows", None)
        monkeypatch.setattr(moves, "TEAM", False)
    return str(request.param)


@pytest.mark.parametrize(("row", "dtype"), list(WIDTH))
def test_moves_are_bit_copies(copy_path: str, dtype: torch.dtype, row: tuple[int, ...]) -> None:
    k, v = _pool((40, *row), dtype, 1), _pool((40, *row), dtype, 2)
    assert moves._width(k) == WIDTH[row, dtype]
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


def test_wide_words_keep_signalling_nans(copy_path: str) -> None:
    """complex128 rows whose every double is a signalling NaN with a payload, and a pool
    only 8-byte aligned: every move keeps every bit."""
    g = torch.Generator().manual_seed(3)
    payload = torch.randint(1, 2**50, (41, 4, 2, 4), generator=g, dtype=torch.int64)
    bits = payload | (0x7FF << 52) | torch.randint(0, 2, payload.shape, generator=g, dtype=torch.int64) << 63
    pool = bits.view(torch.float32)  # 4 tokens x 2 heads x 8 fp32 = 256-byte rows
    k, v = pool[:20], pool[20:40]
    assert moves._width(k) == 16
    odd = pool.view(-1)[2 : 2 + k.numel()].view(k.shape)  # 8 bytes further on
    assert moves._width(odd) == 8
    ids = torch.tensor([3, 19, 0, 7], dtype=torch.int32)
    for src in (k, odd):
        kb, vb = moves.gather_pages(src, v, ids)
        assert torch.equal(kb.view(torch.int32), src[ids.long()].view(torch.int32))
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        moves.scatter_pages(kb, vb, dk, dv, ids)
        moves.copy_pages(src, v, ids, dk, dv, ids + 0)
        assert torch.equal(dk[ids.long()].view(torch.int32), src[ids.long()].view(torch.int32))
        assert torch.equal(dv[ids.long()].view(torch.int32), v[ids.long()].view(torch.int32))


def test_the_c_copy_joins_the_openmp_runtime_torch_loaded_and_never_loads_one() -> None:
    if moves._rows is None:
        pytest.skip("the _rows extension was not built (no C compiler or Python headers)")
    loaded = moves._openmp_runtime()
    assert moves.TEAM == (loaded is not None)
    if loaded is not None:
        assert Path(loaded).name.startswith(("libgomp", "libiomp"))
        assert moves._rows.use_openmp(loaded)
    assert not moves._rows.use_openmp("/nonexistent/libgomp.so.1")
    maps = Path("/proc/self/maps").read_text()
    for other in Path("/usr/lib").rglob("libgomp.so*"):  # a runtime on disk, not loaded: stays so
        if str(other) not in maps and other.resolve() != Path(loaded or "/").resolve():
            assert not moves._rows.use_openmp(str(other))
            assert str(other) not in Path("/proc/self/maps").read_text()


def test_rows_extension_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") is None or not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        pytest.skip("no C compiler or Python headers: the install skips the extension")
    assert moves._rows is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_pages_is_a_bit_copy_on_every_path(copy_path: str, dtype: torch.dtype) -> None:
    """Enough 64 KiB pages that the C path splits them over threads, NaN payloads among
    them; rows of 6 bytes too (no whole cache lines: memcpy)."""
    for row, pages in (((16, 8, 128), 48), ((1, 1, 3), 40)):
        k, v = _pool((pages, *row), dtype, 4), _pool((pages, *row), dtype, 5)
        g = torch.Generator().manual_seed(6)
        src = torch.randint(0, pages, (pages // 2,), generator=g, dtype=torch.int32)  # repeats allowed
        dst = torch.randperm(pages, generator=g)[: pages // 2].to(torch.int32)
        dk, dv = _pool((pages, *row), dtype, 7), _pool((pages, *row), dtype, 8)
        ek, ev = dk.clone(), dv.clone()
        ek[dst.long()], ev[dst.long()] = k[src.long()], v[src.long()]
        moves.copy_pages(k, v, src, dk, dv, dst)
        assert torch.equal(dk.view(torch.uint8), ek.view(torch.uint8)), copy_path
        assert torch.equal(dv.view(torch.uint8), ev.view(torch.uint8)), copy_path
        none = torch.zeros(0, dtype=torch.int32)
        moves.copy_pages(k, v, none, dk, dv, none)  # no pages: nothing changes
        assert torch.equal(dk.view(torch.uint8), ek.view(torch.uint8)), copy_path


def test_the_c_path_checks_ids_before_a_byte_moves() -> None:
    """The C path turns ids into addresses: one out of range never reaches it."""
    if moves._rows is None:
        pytest.skip("the _rows extension was not built (no C compiler or Python headers)")
    k, v = _pool((8, 2, 2, 8), torch.float32, 1), _pool((8, 2, 2, 8), torch.float32, 2)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for src, dst, name in (([0, 8], [1, 2], "src_ids"), ([0, 1], [2, -1], "dst_ids"), ([0, 1], [2, 9], "dst_ids")):
        with pytest.raises(IndexRangeError, match=name):
            moves.copy_pages(k, v, torch.tensor(src), dk, dv, torch.tensor(dst))
        assert not dk.any() and not dv.any()


def _spans(seed: int, size: int, count: int) -> np.ndarray:
    """``count`` spans of odd lengths and unaligned offsets, dst spans disjoint, within ``size`` bytes."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, size), size=2 * count, replace=False))
    starts, ends = cuts[0::2], cuts[1::2]
    src = rng.integers(0, size - (ends - starts) + 1)
    return np.stack([starts, src, ends - starts], axis=1).astype(np.int64)


@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize(("size", "count"), [(600, 7), (1 << 16, 9), (3 << 16, 40)])
def test_copy_spans_copies_each_pairs_spans_and_nothing_else(team: bool, size: int, count: int) -> None:
    """Split by bytes over the team, a thread's share starts and ends inside spans: every
    span is still whole, streamed or not, and no byte outside them moves."""
    if moves._rows is None:
        pytest.skip("the _rows extension was not built (no C compiler or Python headers)")
    pairs = [
        (_pool((size // 4,), torch.float32, 2 * i), _pool((size // 4,), torch.float32, 2 * i + 1)) for i in range(3)
    ]
    spans = np.concatenate([np.insert(_spans(i, size, count), 0, i, axis=1) for i in (2, 0, 1)])  # pairs in any order
    want = [d.clone() for d, _ in pairs]
    for p, d0, s0, n in spans:
        want[p].view(torch.uint8).numpy()[d0 : d0 + n] = pairs[p][1].view(torch.uint8).numpy()[s0 : s0 + n]
    assert moves.copy_spans(pairs, spans, team=team)
    for (d, _), w in zip(pairs, want):
        assert torch.equal(d.view(torch.uint8), w.view(torch.uint8))


def test_copy_spans_checks_every_span_before_a_byte_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A span outside its pair's tensors (or naming no pair): nothing moves, not even the
    good spans before it."""
    if moves._rows is None:
        pytest.skip("the _rows extension was not built (no C compiler or Python headers)")
    dst, src, small = torch.zeros(64), _pool((64,), torch.float32, 1), _pool((32,), torch.float32, 2)
    for bad in (
        [0, 250, 0, 8],  # dst end past 256 bytes
        [1, 64, 120, 16],  # src end past pair 1's 128 bytes
        [0, -4, 0, 8],  # negative offset
        [0, 40, 0, -8],  # negative length
        [2, 0, 0, 8],  # no pair 2
        [0, 8, 0, 2**62],  # an end past 2**63 (no overflow)
    ):
        with pytest.raises(IndexRangeError, match=r"spans.*span 1"):
            moves.copy_spans([(dst, src), (dst, small)], np.array([[0, 0, 0, 16], bad]), team=True)
        assert not dst.any()
    monkeypatch.setattr(moves, "_rows", None)
    assert not moves.copy_spans([(dst, src)], np.array([[0, 0, 0, 16]]), team=True)  # no kernel: the caller copies
    assert not dst.any()
