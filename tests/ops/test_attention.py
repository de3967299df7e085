"""fusion_attention on the reference device against the dense float64 definition."""

from __future__ import annotations

import itertools

import kvfuse
import pytest
import torch
from kvcases import TOL, Problem, assert_close_lse, dense_attention, make_problem
from kvfuse.ops._attention import fusion_attention_reference

# requests: segments (length, pos) with gaps, out-of-order positions and empty segments
SPECS = {
    "one-seg": ([[(37, 0)]], [[37, 40, 3]]),
    "gapped-out-of-order": ([[(20, 500), (0, 0), (33, 0), (5, 200)]], [[0, 10, 32, 199, 204, 530, 600]]),
    "two-requests": ([[(17, 64), (16, 0)], [(1, 7), (40, 100)]], [[80, 81, 0], [7, 139, 140, 5]]),
    "empty-request": ([[], [(9, 3)]], [[5, 6], [3, 12]]),
    "no-queries": ([[(9, 0)], [(4, 0)]], [[], [2]]),
}


def _call(p: Problem, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    return kvfuse.fusion_attention(*p.args(), p.segments, device="reference", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize(
    ("hq", "hkv", "d"), [(4, 4, 64), (8, 2, 80), (7, 1, 128)], ids=["mha", "gqa4-hd80", "gqa7-hd128"]
)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": False},
        {"window_left": 8},
        {"softcap": 5.0, "sm_scale": 0.3},
        {"rope": kvfuse.RopeConfig(max_position=1024)},
        {"rope": kvfuse.RopeConfig(style="gptj", rotary_dim=32, theta=500.0, max_position=1024), "causal": False},
    ],
    ids=["causal", "non-causal", "window", "softcap", "rope-neox", "rope-gptj-partial"],
)
def test_matches_dense_fp32(spec: str, hq: int, hkv: int, d: int, kw: dict[str, object]) -> None:
    segs, qpos = SPECS[spec]
    p = make_problem(segs, qpos, hq=hq, hkv=hkv, d=d, seed=hash((spec, hq, d)) % 1000)
    out, lse = _call(p, **kw)
    ref_out, ref_lse = dense_attention(p, **kw)  # type: ignore[arg-type]
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_close_lse(lse, ref_lse, 1e-5, 1e-5)
    # the float64 reference itself agrees with the definition to float64 precision
    out64, lse64 = fusion_attention_reference(*p.args(), p.segments, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(out64, ref_out, atol=1e-10, rtol=1e-10)
    assert_close_lse(lse64, ref_lse, 1e-10, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_contract_tolerance(dtype: torch.dtype) -> None:
    segs, qpos = SPECS["gapped-out-of-order"]
    p = make_problem(segs, qpos, hq=8, hkv=2, d=128, dtype=dtype, seed=5)
    rope = kvfuse.RopeConfig(max_position=1024)
    out, lse = _call(p, rope=rope, softcap=20.0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = dense_attention(p, rope=rope, softcap=20.0)
    (oa, orr), (la, lr) = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=oa, rtol=orr)
    assert_close_lse(lse, ref_lse, la, lr)


def test_fully_masked_rows_are_zero_and_neg_inf() -> None:
    # query at position 5 sees nothing: all keys sit at >= 100 (causal) or outside the window
    p = make_problem([[(16, 100)]], [[5, 100, 300]], seed=3)
    out, lse = _call(p, window_left=50)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))
    assert torch.isfinite(lse[1]).all() and not out.isnan().any()


def test_rope_equals_rotating_first() -> None:
    """Un-rotated pool + rope == pre-rotated q and keys without rope (the contract's definition)."""
    p = make_problem([[(20, 300), (7, 0)]], [[3, 310, 319]], d=64, seed=9)
    rope = kvfuse.RopeConfig(max_position=512)
    out, lse = _call(p, rope=rope)
    cos, sin = rope.table(64)
    pre = make_problem([[(20, 300), (7, 0)]], [[3, 310, 319]], d=64, seed=9)
    for (n, pos), ids in zip(p.spec[0], p.pages[0]):
        for t in range(n):
            pg, row = ids[t // 16], t % 16
            z = pre.k_pages[pg, row, :, :32] + 1j * pre.k_pages[pg, row, :, 32:]
            z = z * torch.complex(cos[pos + t], sin[pos + t])
            pre.k_pages[pg, row, :, :32], pre.k_pages[pg, row, :, 32:] = z.real, z.imag
    zq = pre.q[..., :32] + 1j * pre.q[..., 32:]
    zq = zq * torch.complex(cos[pre.q_pos.long()], sin[pre.q_pos.long()])[:, None, :]
    pre.q[..., :32], pre.q[..., 32:] = zq.real, zq.imag
    out2, lse2 = _call(pre)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_split_and_merge_equals_whole(seed: int) -> None:
    segs = [[(20, 500), (33, 0), (5, 200), (16, 40)]]
    p = make_problem(segs, [[0, 35, 210, 530, 540]], hq=8, hkv=2, seed=seed)
    kw = {"rope": kvfuse.RopeConfig(max_position=1024), "softcap": 10.0}
    whole = _call(p, **kw)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(4, generator=g)[:2].tolist()
    parts = []
    for group in (chosen, [s for s in range(4) if s not in chosen]):
        table = kvfuse.SegmentTable.from_lists([[(p.pages[0][s], *segs[0][s]) for s in group]])
        parts.append(kvfuse.fusion_attention(*p.args(), table, device="reference", **kw))  # type: ignore[arg-type]
    merged = kvfuse.merge_states(parts, device="reference")
    torch.testing.assert_close(merged[0], whole[0], atol=1e-5, rtol=1e-5)
    assert_close_lse(merged[1], whole[1], 1e-5, 1e-5)


def test_segment_order_does_not_change_result() -> None:
    segs = [[(20, 500), (0, 0), (33, 0), (5, 200)]]
    p = make_problem(segs, [[0, 35, 210, 530]], hq=8, hkv=2, seed=11)
    base = _call(p)
    for perm in itertools.islice(itertools.permutations(range(4)), 1, None, 5):
        table = kvfuse.SegmentTable.from_lists([[(p.pages[0][s], *segs[0][s]) for s in perm]])
        out, lse = kvfuse.fusion_attention(*p.args(), table, device="reference")
        torch.testing.assert_close(out, base[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, base[1], atol=1e-6, rtol=1e-6)


def test_empty_segment_position_is_not_a_key_position() -> None:
    """An empty segment holds no key, so its position may lie past the RoPE table."""
    p = make_problem([[(5, 0), (0, 0)]], [[4]], seed=2)
    table = kvfuse.SegmentTable.from_lists([[(p.pages[0][0], 5, 0), ([], 0, 5000)]])
    out, _ = kvfuse.fusion_attention(*p.args(), table, rope=kvfuse.RopeConfig(max_position=64), device="reference")
    ref, _ = kvfuse.fusion_attention(*p.args(), p.segments, rope=kvfuse.RopeConfig(max_position=64), device="reference")
    assert torch.equal(out, ref)
