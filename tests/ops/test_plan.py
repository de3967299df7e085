"""Plan / run: validated once, run per layer with metadata checks only, bit-identical to
the one-shot call (the conformance suite checks every case both ways)."""

from __future__ import annotations

import kvfuse
import pytest
import torch
from kvcases import make_problem


def test_a_plan_runs_every_layer_bit_identically_and_flattens_once(monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_problem([[(40, 0), (7, 40)], [(5, 3)]], [[47, 48], [8]])
    rope = kvfuse.RopeConfig(max_position=64)
    plan = kvfuse.plan_attention(p.q_indptr, p.q_pos, p.segments, p.k_pages, p.v_pages, num_q_heads=4, rope=rope)
    calls = []
    original = kvfuse.SegmentTable.flatten
    monkeypatch.setattr(kvfuse.SegmentTable, "flatten", lambda self, n: calls.append(n) or original(self, n))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # three "layers": new q and pools of the plan's geometry
        q = torch.randn(p.q.shape, generator=g)
        k, v = torch.randn(p.k_pages.shape, generator=g), torch.randn(p.v_pages.shape, generator=g)
        got = plan.run(q, k, v)
        want = kvfuse.fusion_attention(q, p.q_indptr, p.q_pos, k, v, p.segments, rope=rope)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(calls) == 3  # the one-shot calls flatten; the planned runs reuse the plan's


def test_runs_refuse_what_the_plan_did_not_fix() -> None:
    p = make_problem([[(20, 0)]], [[19]])
    plan = kvfuse.plan_attention(p.q_indptr, p.q_pos, p.segments, p.k_pages, p.v_pages, num_q_heads=4)
    for args, err, name in (
        ((p.q[:, :2], p.k_pages, p.v_pages), kvfuse.ShapeError, "q"),
        ((p.q.half(), p.k_pages, p.v_pages), kvfuse.DTypeError, "q"),
        ((p.q, p.k_pages[:-1], p.v_pages), kvfuse.ShapeError, "k_pages"),
        ((p.q, p.k_pages, p.v_pages.transpose(1, 2).contiguous().transpose(1, 2)), kvfuse.ShapeError, "v_pages"),
    ):
        with pytest.raises(err) as info:
            plan.run(*args)
        assert info.value.argument == name
    with pytest.raises(kvfuse.IndexRangeError, match="slot_mapping"):
        kvfuse.plan_append(torch.tensor([3, 3]), p.k_pages, p.v_pages)


def test_append_plan_writes_what_append_kv_writes() -> None:
    p = make_problem([[(20, 0)]], [[19]])
    slots = torch.tensor([5, -1, 70, 2])
    plan = kvfuse.plan_append(slots, p.k_pages, p.v_pages)
    k, v = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    a = (p.k_pages.clone(), p.v_pages.clone())
    b = (p.k_pages.clone(), p.v_pages.clone())
    plan.run(k, v, *a)
    kvfuse.append_kv(k, v, *b, slots)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_append_runs_name_the_argument_and_its_kind_of_error() -> None:
    p = make_problem([[(20, 0)]], [[19]])
    plan = kvfuse.plan_append(torch.tensor([5, 6]), p.k_pages, p.v_pages)
    k = torch.randn(2, 2, 64)
    before = p.k_pages.clone()
    for args, err, name in (
        ((k[:1], k, p.k_pages, p.v_pages), kvfuse.ShapeError, "k"),
        ((k, k.half(), p.k_pages, p.v_pages), kvfuse.DTypeError, "v"),
        ((k, k, p.k_pages[:-1], p.v_pages), kvfuse.ShapeError, "k_pages"),
    ):
        with pytest.raises(err) as info:
            plan.run(*args)
        assert info.value.argument == name
    assert torch.equal(p.k_pages, before)
