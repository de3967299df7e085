"""Decode along a plan chain (``plan_attention(..., extends=previous)``) on the cpu
device: each layer's keys are gathered and rotated once and kept between steps, only the
new keys are added, and every step is bit-identical to the one-shot call — also when the
new step's keys do not extend the old ones (the device then recomputes)."""

from __future__ import annotations

import kvfuse
import pytest
import torch
from kvfuse import InvalidValueError, RopeConfig, SegmentTable
from kvfuse.devices.cpu import decode

pytest.importorskip("openvino")
HQ, HKV, D, P = 9, 3, 64, 16
ROPE = RopeConfig(theta=1e5, max_position=8192)


def _step(n_live: int, stored: list[int]) -> tuple[SegmentTable, torch.Tensor, torch.Tensor]:
    table = SegmentTable.from_lists([[(stored, len(stored) * P, 0), ([100, 101][: -(-n_live // P)], n_live, 480)]])
    q_pos = torch.tensor([len(stored) * P + n_live - 1], dtype=torch.int32)
    return table, torch.tensor([0, 1], dtype=torch.int32), q_pos


def _kept(plan: kvfuse.AttentionPlan, pool: torch.Tensor) -> int:
    """Keys the cpu device has gathered into its kept buffers for ``pool``'s layer, in all."""
    held = [h for h in (plan.segments.carried() or {}).values() if isinstance(h, decode._Held)]
    return sum(h.gathered for h in held if h.k_rows.data_ptr() == pool.data_ptr())


@pytest.mark.parametrize("rope", [ROPE, None], ids=["rope", "no-rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_chain_gathers_only_new_keys_and_matches_one_shot(dtype: torch.dtype, rope: RopeConfig | None) -> None:
    g = torch.Generator().manual_seed(0)
    pools = [torch.randn(128, P, HKV, D, generator=g).to(dtype) for _ in range(4)]  # two layers' k, v
    stored = list(range(10, 40))
    prev = None
    for step in range(5):
        n_live = 5 + step
        if step == 3:  # another stored chunk: nothing carried over applies
            stored = list(range(50, 80))
        table, q_indptr, q_pos = _step(n_live, stored)
        plan = kvfuse.plan_attention(
            q_indptr, q_pos, table, pools[0], pools[1], num_q_heads=HQ, rope=rope, device="cpu", extends=prev
        )
        for k, v in ((pools[0], pools[1]), (pools[2], pools[3])):
            q = torch.randn(1, HQ, D, generator=g).to(dtype)
            before = _kept(plan, k)
            out, lse = plan.run(q, k, v)
            want_out, want_lse = kvfuse.fusion_attention(q, q_indptr, q_pos, k, v, table, rope=rope, device="cpu")
            assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
            # a lone plan keeps nothing; the first plan extended rebuilds; then only the new key
            # is gathered, until the stored chunk changes
            new = _kept(plan, k) - before
            assert new == {0: 0, 1: 480 + n_live, 3: 480 + n_live}.get(step, 1), (step, new)
        for k, v in ((pools[0], pools[1]), (pools[2], pools[3])):  # the next token's row, after this step
            k[100 + n_live // P, n_live % P] = torch.randn(HKV, D, generator=g).to(dtype)
            v[100 + n_live // P, n_live % P] = torch.randn(HKV, D, generator=g).to(dtype)
        prev = plan


def test_extends_must_be_a_plan_of_the_same_geometry() -> None:
    pools = torch.zeros(2, 128, P, HKV, D)
    table, q_indptr, q_pos = _step(3, [1, 2])
    base = kvfuse.plan_attention(q_indptr, q_pos, table, pools[0], pools[1], num_q_heads=HQ, device="cpu")
    with pytest.raises(InvalidValueError) as err:
        kvfuse.plan_attention(q_indptr, q_pos, table, pools[0], pools[1], num_q_heads=HQ, device="cpu", extends=3)  # type: ignore[arg-type]
    assert err.value.argument == "extends"
    with pytest.raises(InvalidValueError):
        kvfuse.plan_attention(
            q_indptr, q_pos, table, pools[0], pools[1], num_q_heads=HQ, rope=ROPE, device="cpu", extends=base
        )


@pytest.mark.parametrize("rope", [ROPE, None], ids=["rope", "no-rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_plain_causal_prefill_takes_torchs_causal_kernel(dtype: torch.dtype, rope: RopeConfig | None) -> None:
    """A request whose queries are its keys (a model's prefill) runs torch's causal flash
    kernel on the cpu device, within the contract's tolerance of the float64 reference;
    a request over a stored prefix does not (its mask is not square)."""
    from kvfuse.ops._attention import fusion_attention_reference
    from kvfuse.ops._checks import TOLERANCES

    g = torch.Generator().manual_seed(3)
    n = 300  # pages 5..23, the last one partly filled
    k, v = (torch.randn(40, P, HKV, D, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(n, HQ, D, generator=g).to(dtype)
    table = SegmentTable.from_lists([[(list(range(5, 24)), n, 7)]])
    q_indptr, q_pos = torch.tensor([0, n], dtype=torch.int32), torch.arange(7, 7 + n, dtype=torch.int32)
    plan = kvfuse.plan_attention(q_indptr, q_pos, table, k, v, num_q_heads=HQ, rope=rope, device="cpu")
    out, lse = plan.run(q, k, v)
    route = plan.segments._memo[next(iter(plan.segments._memo))][1]  # type: ignore[attr-defined]
    assert [r.square for r in route.decode] == [True] and not route.rest
    want_out, want_lse = fusion_attention_reference(q, q_indptr, q_pos, k, v, table, rope=rope)
    (out_atol, out_rtol), (lse_atol, lse_rtol) = TOLERANCES["fp32" if dtype == torch.float32 else "bf16"]
    torch.testing.assert_close(out.double(), want_out, atol=out_atol, rtol=out_rtol)
    torch.testing.assert_close(lse.double(), want_lse, atol=lse_atol, rtol=lse_rtol)
    one_shot = kvfuse.fusion_attention(q, q_indptr, q_pos, k, v, table, rope=rope, device="cpu")
    assert torch.equal(out, one_shot[0]) and torch.equal(lse, one_shot[1])
    prefix = SegmentTable.from_lists([[([30], 16, 0), (list(range(5, 24)), n, 16)]])
    shifted = torch.arange(16, 16 + n, dtype=torch.int32)
    other = kvfuse.plan_attention(q_indptr, shifted, prefix, k, v, num_q_heads=HQ, rope=rope, device="cpu")
    other.run(q, k, v)
    route = other.segments._memo[next(iter(other.segments._memo))][1]  # type: ignore[attr-defined]
    assert not route.decode and len(route.rest) == 1
