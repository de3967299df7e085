from __future__ import annotations

import collections

import pytest
from kvfuse._device import OP_NAMES
from kvfuse.conformance import PROFILES, TOLERANCES, all_cases, cases, get_case
from kvfuse.conformance._inputs import attention_inputs
from kvfuse.ops._attention import fusion_attention_reference
from kvfuse.ops._rope import rotate


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
    attn = [c.params for c in standard if c.op == "fusion_attention" and c.kind in ("value", "invariant")]
    assert {p["dtype"] for p in attn} == {"fp32", "fp16", "bf16"}
    assert {p["head_dim"] for p in attn} == {64, 80, 128, 256}
    assert {1, 4, 7} <= {p["group"] for p in attn}
    assert {p["page_size"] for p in attn} == {1, 16, 64}
    stored = {s[0] for p in attn for r in p["layout"]["requests"] for s in r["stored"]}
    live = {r["live"][0] for p in attn for r in p["layout"]["requests"]}
    assert {0, 1, 17, 2048} <= stored and {0, 1, 129} <= live
    assert any(p.get("pool_pages", 0) >= 32768 for p in attn)
    assert {p.get("invariant") for p in attn} >= {"split-merge", "segment-order"}
    assert sum(c.kind == "bad_input" for c in standard) >= 40
    layout = {(c.op, c.params["arg"]) for c in standard if c.kind == "layout"}
    assert {op for op, _ in layout} == set(OP_NAMES) and ("fusion_attention", "q_pos") in layout
    copies = {c.params.get("pools") for c in standard if c.op == "copy_pages"}
    assert {"host-host", "host-device", "device-host"} <= copies


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        cases("nightly")


def _rounded_rotation(case_id: str) -> tuple[float, float]:
    """A device that rounds rotated q and k to the case's dtype before scoring: its worst
    out and lse error, each as a multiple of the case's tolerance at that element."""
    case = get_case(case_id)
    x = attention_inputs(case.params, case.seed(0))
    rope = x.kwargs["rope"]
    table = x.table()
    ref_out, ref_lse = fusion_attention_reference(*x.args(table), **x.kwargs)
    d = x.q.shape[-1]
    cos, sin = rope.table(d, x.q.device)
    q = rotate(x.q.double(), cos[x.q_pos.long()], sin[x.q_pos.long()], rope.style).to(x.q.dtype)
    flat = table.flatten(x.k_pages.shape[1])
    k = x.k_pages.reshape(-1, *x.k_pages.shape[2:]).clone()
    k[flat.slots] = rotate(k[flat.slots].double(), cos[flat.k_pos], sin[flat.k_pos], rope.style).to(k.dtype)
    kwargs = {key: v for key, v in x.kwargs.items() if key != "rope"}
    out, lse = fusion_attention_reference(q, x.q_indptr, x.q_pos, k.view_as(x.k_pages), x.v_pages, table, **kwargs)
    (oa, orr), (la, lr) = TOLERANCES[case.tolerance]
    out16 = out.to(x.q.dtype).double()  # what the device would return
    return (
        float(((out16 - ref_out).abs() / (oa + orr * ref_out.abs())).max()),
        float(((lse - ref_lse).abs() / (la + lr * ref_lse.abs())).max()),
    )


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-0.5b", "llama3-8b"])
def test_real_model_rope_cases_catch_rounded_rotation(model: str) -> None:
    """The real-model RoPE family fails a device that rounds rotated q/k to bf16 before its
    dot (what the nvidia kernel did before its split dot), in prefill and decode."""
    for layout in ("rag8k", "rag8k-decode"):
        hd = 128 if model == "llama3-8b" else 64
        group = {"smollm2-135m": 3, "qwen2.5-0.5b": 7, "llama3-8b": 4}[model]
        cid = f"fusion_attention/bf16/hd{hd}/gqa{group}/p16/{layout}/{model}-rope-logits"
        out_ratio, lse_ratio = _rounded_rotation(cid)
        assert max(out_ratio, lse_ratio) > 1.0, (cid, out_ratio, lse_ratio)
