from __future__ import annotations

import collections

import pytest
from kvfuse._device import OP_NAMES
from kvfuse.conformance import PROFILES, all_cases, cases, get_case


def test_ids_are_unique_and_stable() -> None:
    ids = [c.id for c in all_cases()]
    assert len(ids) == len(set(ids))
    case = get_case("fusion_attention/bf16/hd128/gqa4/p16/seg3-gapped/softcap")
    assert case.seed(0) == get_case(case.id).seed(0) and case.seed(0) != case.seed(1)


def test_profiles_cover_the_grid() -> None:
    smoke, standard, full = (cases(p) for p in PROFILES)
    assert {c.id for c in smoke} <= {c.id for c in standard} <= {c.id for c in full}
    assert len(standard) >= 200
    ops = collections.Counter(c.op for c in standard)
    assert set(ops) == set(OP_NAMES)
    attn = [c.params for c in standard if c.op == "fusion_attention" and c.kind != "bad_input"]
    assert {p["dtype"] for p in attn} == {"fp32", "fp16", "bf16"}
    assert {p["head_dim"] for p in attn} == {64, 80, 128, 256}
    assert {p["group"] for p in attn} == {1, 4, 7}
    assert {p["page_size"] for p in attn} == {1, 16, 64}
    stored = {s[0] for p in attn for r in p["layout"]["requests"] for s in r["stored"]}
    live = {r["live"][0] for p in attn for r in p["layout"]["requests"]}
    assert {0, 1, 17, 2048} <= stored and {0, 1, 129} <= live
    assert any(p.get("pool_pages", 0) >= 32768 for p in attn)
    assert {p.get("invariant") for p in attn} >= {"split-merge", "segment-order"}
    assert sum(c.kind == "bad_input" for c in standard) >= 40


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        cases("nightly")
