"""Moves are bit-exact: compared with torch.equal against plain per-page copies."""

from __future__ import annotations

import kvfuse
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pool(
    num_pages: int = 12, page_size: int = 4, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_pages, page_size, 2, 8, generator=g).to(dtype)
    return kv[0], kv[1]  # slices of one [2, ...] tensor are allowed


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_append_kv(dtype: torch.dtype) -> None:
    kp, vp = _pool(dtype=dtype)
    before_k, before_v = kp.clone(), vp.clone()
    k = torch.randn(5, 2, 8).to(dtype)
    v = torch.randn(5, 2, 8).to(dtype)
    slots = torch.tensor([47, -1, 0, 13, 5], dtype=torch.int64)
    kvfuse.append_kv(k, v, kp, vp, slots, device="reference")
    want_k, want_v = before_k.clone(), before_v.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 4, s % 4] = k[t]
            want_v[s // 4, s % 4] = v[t]
    assert torch.equal(kp, want_k) and torch.equal(vp, want_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_gather_scatter_round_trip(dtype: torch.dtype) -> None:
    kp, vp = _pool(dtype=dtype)
    ids = torch.tensor([7, 2, 7, 11], dtype=torch.int32)  # repeated ids allowed in gather
    kb, vb = kvfuse.gather_pages(kp, vp, ids, device="reference")
    assert kb.is_contiguous() and kb.shape == (4, 4, 2, 8)
    for i, p in enumerate(ids.tolist()):
        assert torch.equal(kb[i], kp[p]) and torch.equal(vb[i], vp[p])
    dk, dv = _pool(dtype=dtype, seed=1)
    untouched = dk.clone()
    dst = torch.tensor([0, 5, 9], dtype=torch.int32)
    kvfuse.scatter_pages(kb[1:], vb[1:], dk, dv, dst, device="reference")
    for i, p in enumerate(dst.tolist()):
        assert torch.equal(dk[p], kb[1 + i]) and torch.equal(dv[p], vb[1 + i])
    others = [p for p in range(12) if p not in dst.tolist()]
    assert torch.equal(dk[others], untouched[others])


@pytest.mark.parametrize("non_blocking", [False, True])
def test_copy_pages_between_pools(non_blocking: bool) -> None:
    sk, sv = _pool(num_pages=6)
    dk, dv = _pool(num_pages=40000, seed=2)  # ≥ 32768 pages: index overflow guard
    src_before, dst_before = sk.clone(), dk.clone()
    src = torch.tensor([5, 0, 5], dtype=torch.int32)
    dst = torch.tensor([39999, 32768, 3], dtype=torch.int32)
    handle = kvfuse.copy_pages(sk, sv, src, dk, dv, dst, non_blocking=non_blocking, device="reference")
    handle.wait(timeout=30)
    assert handle.done()
    assert torch.equal(sk, src_before)
    for s, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(dk[d], sk[s]) and torch.equal(dv[d], sv[s])
    mask = torch.ones(40000, dtype=torch.bool)
    mask[dst.long()] = False
    assert torch.equal(dk[mask], dst_before[mask])


def test_copy_within_one_pool_disjoint_ids() -> None:
    kp, vp = _pool()
    before = kp.clone()
    kvfuse.copy_pages(
        kp, vp, torch.tensor([1, 2], dtype=torch.int32), kp, vp, torch.tensor([3, 4], dtype=torch.int32)
    ).wait()
    assert torch.equal(kp[3], before[1]) and torch.equal(kp[4], before[2]) and torch.equal(kp[1], before[1])


def test_transfer_handle_reports_failed_pages() -> None:
    import concurrent.futures

    fut: concurrent.futures.Future[None] = concurrent.futures.Future()
    handle = kvfuse.TransferHandle([4, 9], fut)
    assert not handle.done()
    with pytest.raises(kvfuse.TransferTimeoutError):
        handle.wait(timeout=0.01)
    fut.set_exception(RuntimeError("link down"))
    with pytest.raises(kvfuse.TransferError) as info:
        handle.wait()
    assert info.value.failed_pages == [4, 9] and "link down" in str(info.value)


@pytest.mark.parametrize("device", ["reference", "cpu", "npu"])
def test_gather_pages_into_caller_buffers(device: str) -> None:
    """``out=``: the pages land in the caller's buffers, bit for bit (devices that take
    ``out`` write them; others' results are copied in); a bad ``out`` is a ContractError
    naming it, before any write."""
    pytest.importorskip("openvino" if device == "cpu" else "torch")
    g = torch.Generator().manual_seed(4)
    kp, vp = torch.randn(32, 16, 2, 8, generator=g).to(torch.bfloat16), torch.randn(32, 16, 2, 8, generator=g)
    vp = vp.to(torch.bfloat16)
    ids = torch.tensor([3, 5, 3, 7], dtype=torch.int32)
    out = (torch.zeros(4, 16, 2, 8, dtype=torch.bfloat16), torch.zeros(4, 16, 2, 8, dtype=torch.bfloat16))
    got = kvfuse.gather_pages(kp, vp, ids, out=out, device=device)
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(out[0], kp[ids.long()]) and torch.equal(out[1], vp[ids.long()])
    z = torch.zeros(4, 16, 2, 8, dtype=torch.bfloat16)
    for bad, name in (
        ((z,), "out"),
        ((torch.zeros(3, 16, 2, 8, dtype=torch.bfloat16), z), "out[0]"),
        ((z, torch.zeros(4, 16, 2, 8)), "out[1]"),
        ((z, torch.zeros(4, 2, 16, 8, dtype=torch.bfloat16).transpose(1, 2)), "out[1]"),
        ((z, z), "out[1]"),
        ((kp[:4], torch.ones(4, 16, 2, 8, dtype=torch.bfloat16)), "out[0]"),
    ):
        before = [t.clone() for t in bad]
        with pytest.raises(kvfuse.ContractError) as err:
            kvfuse.gather_pages(kp, vp, ids, out=bad, device=device)  # type: ignore[arg-type]
        assert err.value.argument == name
        assert all(torch.equal(t, b) for t, b in zip(bad, before))
