"""Every malformed call raises the documented kvfuse error, naming the argument, and leaves
every tensor bit-identical."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import kvfuse
import pytest
import torch
from kvcases import make_problem

I32 = torch.int32


def _attention_call(**over: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
    p = make_problem([[(20, 40), (5, 0)], [(16, 0)]], [[45, 46], [3]], hq=4, hkv=2, d=16, page_size=8)
    kw: dict[str, Any] = {
        "q": p.q, "q_indptr": p.q_indptr, "q_pos": p.q_pos, "k_pages": p.k_pages, "v_pages": p.v_pages,
        "segments": p.segments,
    }  # fmt: skip
    kw.update(over)
    return kvfuse.fusion_attention, kw


def _seg(**over: Any) -> kvfuse.SegmentTable:
    base = make_problem([[(20, 40), (5, 0)], [(16, 0)]], [[45, 46], [3]], hq=4, hkv=2, d=16, page_size=8).segments
    fields = {f: getattr(base, f) for f in ("seg_indptr", "page_indptr", "page_indices", "seg_len", "seg_pos")}
    fields.update(over)
    return kvfuse.SegmentTable(**fields)


def _pool(num_pages: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(num_pages, 4, 2, 8), torch.randn(num_pages, 4, 2, 8)


def _i(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=I32)


ATTN_CASES = {
    "q-rank": ({"q": torch.randn(3, 64)}, kvfuse.ShapeError, "q"),
    "q-int": ({"q": torch.zeros(3, 4, 16, dtype=torch.int32)}, kvfuse.DTypeError, "q"),
    "q-not-tensor": ({"q": [[1.0]]}, kvfuse.DTypeError, "q"),
    "mixed-dtype": ({"q": torch.randn(3, 4, 16, dtype=torch.float16)}, kvfuse.DTypeError, "k_pages"),
    "head-dim": ({"q": torch.randn(3, 4, 32)}, kvfuse.ShapeError, "k_pages"),
    "gqa-ratio": ({"q": torch.randn(3, 3, 16)}, kvfuse.InvalidValueError, "k_pages"),
    "q-indptr-int64": ({"q_indptr": torch.tensor([0, 2, 3])}, kvfuse.DTypeError, "q_indptr"),
    "q-indptr-batch": ({"q_indptr": _i(0, 3)}, kvfuse.ShapeError, "q_indptr"),
    "q-indptr-end": ({"q_indptr": _i(0, 2, 4)}, kvfuse.IndexRangeError, "q_indptr"),
    "q-pos-negative": ({"q_pos": _i(45, -1, 3)}, kvfuse.IndexRangeError, "q_pos"),
    "q-pos-length": ({"q_pos": _i(45, 46)}, kvfuse.ShapeError, "q_pos"),
    "page-out-of-range": (
        {"segments": _seg(page_indices=_seg().page_indices.index_fill(0, torch.tensor([3]), 99))},
        kvfuse.IndexRangeError,
        "segments.page_indices",
    ),
    "seg-len-too-long": ({"segments": _seg(seg_len=_i(20, 9, 16))}, kvfuse.ShapeError, "segments.seg_len"),
    "seg-len-too-short": ({"segments": _seg(seg_len=_i(8, 5, 16))}, kvfuse.ShapeError, "segments.seg_len"),
    "seg-pos-negative": ({"segments": _seg(seg_pos=_i(40, -3, 0))}, kvfuse.IndexRangeError, "segments.seg_pos"),
    "seg-indptr-int64": (
        {"segments": _seg(seg_indptr=torch.tensor([0, 2, 3]))},
        kvfuse.DTypeError,
        "segments.seg_indptr",
    ),
    "page-indptr-decreasing": (
        {"segments": _seg(page_indptr=_i(0, 3, 2, 6))},
        kvfuse.IndexRangeError,
        "segments.page_indptr",
    ),
    "segments-type": ({"segments": "pages"}, kvfuse.InvalidValueError, "segments"),
    "v-shape": ({"v_pages": torch.randn(5, 8, 2, 8)}, kvfuse.ShapeError, "v_pages"),
    "pool-non-contiguous": ({"k_pages": torch.randn(9, 2, 8, 16).transpose(1, 2)}, kvfuse.ShapeError, "k_pages"),
    "softcap-negative": ({"softcap": -1.0}, kvfuse.InvalidValueError, "softcap"),
    "sm-scale-zero": ({"sm_scale": 0.0}, kvfuse.InvalidValueError, "sm_scale"),
    "window-float": ({"window_left": 1.5}, kvfuse.InvalidValueError, "window_left"),
    "rope-odd-dim": ({"rope": kvfuse.RopeConfig(rotary_dim=7)}, kvfuse.InvalidValueError, "rope.rotary_dim"),
    "rope-q-pos-past-table": ({"rope": kvfuse.RopeConfig(max_position=46)}, kvfuse.IndexRangeError, "q_pos"),
    "rope-k-pos-past-table": (
        {"rope": kvfuse.RopeConfig(max_position=50), "q_pos": _i(45, 46, 3)},
        kvfuse.InvalidValueError,
        "segments.seg_pos",
    ),
}


def _snapshot(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, kvfuse.SegmentTable):
        return [obj.seg_indptr, obj.page_indptr, obj.page_indices, obj.seg_len, obj.seg_pos]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _snapshot(x)]
    return []


def _assert_raises_and_unchanged(
    fn: Callable[..., Any], kw: dict[str, Any], err: type[Exception], arg: str, args: tuple[Any, ...] = ()
) -> None:
    tensors = _snapshot(list(kw.values()) + list(args))
    before = [t.clone() for t in tensors]
    with pytest.raises(err) as info:
        fn(*args, device="reference", **kw)
    if isinstance(info.value, kvfuse.ContractError):
        assert info.value.argument == arg, str(info.value)
        assert f"'{arg}'" in str(info.value) and "expected" in str(info.value) and "received" in str(info.value)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b) or (t.isnan() == b.isnan()).all()


@pytest.mark.parametrize("case", ATTN_CASES)
def test_fusion_attention_bad_input(case: str) -> None:
    over, err, arg = ATTN_CASES[case]
    fn, kw = _attention_call(**over)
    _assert_raises_and_unchanged(fn, kw, err, arg)


def _merge_states(lse_fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    bad = torch.zeros(3, 2)
    bad[1, 1] = lse_fill
    return [(torch.randn(3, 2, 8), torch.zeros(3, 2)), (torch.randn(3, 2, 8), bad)]


MOVE_CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], type[Exception], str]] = {}


def _add(name: str, fn: Callable[..., Any], args: tuple[Any, ...], err: type[Exception], arg: str) -> None:
    MOVE_CASES[name] = (fn, args, err, arg)


kp, vp = _pool()
_add("merge-nan-lse", kvfuse.merge_states, (_merge_states(math.nan),), kvfuse.InvalidValueError, "states[1].lse")
_add("merge-pos-inf-lse", kvfuse.merge_states, (_merge_states(math.inf),), kvfuse.InvalidValueError, "states[1].lse")
_add("merge-empty", kvfuse.merge_states, ([],), kvfuse.InvalidValueError, "states")
_add(
    "merge-lse-fp16",
    kvfuse.merge_states,
    ([(torch.randn(3, 2, 8), torch.zeros(3, 2, dtype=torch.float16))],),
    kvfuse.DTypeError,
    "states[0].lse",
)
_add(
    "merge-shape",
    kvfuse.merge_states,
    ([(torch.randn(3, 2, 8), torch.zeros(3, 2)), (torch.randn(3, 2, 4), torch.zeros(3, 2))],),
    kvfuse.ShapeError,
    "states[1].out",
)
_add(
    "append-slot-range",
    kvfuse.append_kv,
    (torch.randn(2, 2, 8), torch.randn(2, 2, 8), kp, vp, torch.tensor([3, 24])),
    kvfuse.IndexRangeError,
    "slot_mapping",
)
_add(
    "append-slot-dup",
    kvfuse.append_kv,
    (torch.randn(3, 2, 8), torch.randn(3, 2, 8), kp, vp, torch.tensor([3, -1, 3])),
    kvfuse.IndexRangeError,
    "slot_mapping",
)
_add(
    "append-slot-int32",
    kvfuse.append_kv,
    (torch.randn(2, 2, 8), torch.randn(2, 2, 8), kp, vp, _i(3, 4)),
    kvfuse.DTypeError,
    "slot_mapping",
)
_add(
    "append-heads",
    kvfuse.append_kv,
    (torch.randn(2, 1, 8), torch.randn(2, 1, 8), kp, vp, torch.tensor([3, 4])),
    kvfuse.ShapeError,
    "k",
)
_add(
    "append-dtype",
    kvfuse.append_kv,
    (torch.randn(2, 2, 8).half(), torch.randn(2, 2, 8).half(), kp, vp, torch.tensor([3, 4])),
    kvfuse.DTypeError,
    "k",
)
_add("gather-range", kvfuse.gather_pages, (kp, vp, _i(0, 6)), kvfuse.IndexRangeError, "page_ids")
_add("gather-negative", kvfuse.gather_pages, (kp, vp, _i(-1)), kvfuse.IndexRangeError, "page_ids")
_add("gather-ids-int64", kvfuse.gather_pages, (kp, vp, torch.tensor([1])), kvfuse.DTypeError, "page_ids")
_add(
    "scatter-dup",
    kvfuse.scatter_pages,
    (torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), kp, vp, _i(1, 1)),
    kvfuse.IndexRangeError,
    "page_ids",
)
_add(
    "scatter-buf-shape",
    kvfuse.scatter_pages,
    (torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), kp, vp, _i(1, 2, 3)),
    kvfuse.ShapeError,
    "k_buf",
)
dk, dv = _pool(3)
_add(
    "copy-geometry",
    kvfuse.copy_pages,
    (kp, vp, _i(0), torch.randn(3, 8, 2, 8), torch.randn(3, 8, 2, 8), _i(0)),
    kvfuse.ShapeError,
    "dst_k",
)
_add("copy-dtype", kvfuse.copy_pages, (kp, vp, _i(0), dk.half(), dv.half(), _i(0)), kvfuse.DTypeError, "dst_k")
_add("copy-dst-dup", kvfuse.copy_pages, (kp, vp, _i(0, 1), dk, dv, _i(2, 2)), kvfuse.IndexRangeError, "dst_ids")
_add("copy-lengths", kvfuse.copy_pages, (kp, vp, _i(0, 1), dk, dv, _i(2)), kvfuse.ShapeError, "dst_ids")
_add("copy-dst-range", kvfuse.copy_pages, (kp, vp, _i(0), dk, dv, _i(3)), kvfuse.IndexRangeError, "dst_ids")
_add(
    "copy-same-pool-overlap", kvfuse.copy_pages, (kp, vp, _i(0, 1), kp, vp, _i(1, 2)), kvfuse.IndexRangeError, "dst_ids"
)
_add(
    "rerotate-pos-past-table",
    kvfuse.rope_rerotate,
    (torch.randn(2, 1, 8), _i(0, 1), _i(0, 10), kvfuse.RopeConfig(max_position=10)),
    kvfuse.IndexRangeError,
    "new_pos",
)
_add(
    "rerotate-pos-length",
    kvfuse.rope_rerotate,
    (torch.randn(2, 1, 8), _i(0), _i(0, 1), kvfuse.RopeConfig()),
    kvfuse.ShapeError,
    "old_pos",
)
_add(
    "blend-ratio",
    kvfuse.blend_select,
    (torch.randn(4, 1, 8), torch.randn(4, 1, 8), 1.5),
    kvfuse.InvalidValueError,
    "ratio",
)
_add(
    "blend-shape", kvfuse.blend_select, (torch.randn(4, 1, 8), torch.randn(5, 1, 8), 0.5), kvfuse.ShapeError, "k_fresh"
)


@pytest.mark.parametrize("case", MOVE_CASES)
def test_other_ops_bad_input(case: str) -> None:
    fn, args, err, arg = MOVE_CASES[case]
    _assert_raises_and_unchanged(fn, {}, err, arg, args)


def test_blend_always_out_of_range() -> None:
    with pytest.raises(kvfuse.IndexRangeError, match="always"):
        kvfuse.blend_select(torch.randn(4, 1, 8), torch.randn(4, 1, 8), 0.5, always=torch.tensor([4]))
