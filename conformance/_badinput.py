"""The bad-input section: each malformed call must raise the documented kvfuse error naming
the argument, and leave every tensor bit-identical. Validation happens in ``kvfuse.ops``
before dispatch, so these hold for every device; they also catch a device plugin that
bypasses or weakens the checks (e.g. by patching ops)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import kvfuse
import torch
from kvfuse.conformance._cases import Case

I32 = torch.int32
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _i(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=I32)


def _s(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def _attention(**over: Any) -> Call:
    """A valid call (2 requests, 3 segments, page_size 8) with ``over`` replacing arguments."""
    g = torch.Generator().manual_seed(0)
    seg = kvfuse.SegmentTable.from_lists([[([8, 1, 6], 20, 40), ([3], 5, 0)], [([0, 7], 16, 0)]])
    fields = {f: getattr(seg, f) for f in ("seg_indptr", "page_indptr", "page_indices", "seg_len", "seg_pos")}
    fields.update({k.removeprefix("seg."): over.pop(k) for k in list(over) if k.startswith("seg.")})
    kw: dict[str, Any] = {
        "q": torch.randn(3, 4, 16, generator=g),
        "q_indptr": _i(0, 2, 3),
        "q_pos": _i(45, 46, 3),
        "k_pages": torch.randn(9, 8, 2, 16, generator=g),
        "v_pages": torch.randn(9, 8, 2, 16, generator=g),
        "segments": kvfuse.SegmentTable(**fields),
    }
    kw.update(over)
    return kvfuse.fusion_attention, (), kw


def _pool(num_pages: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(num_pages, 4, 2, 8, generator=g), torch.randn(num_pages, 4, 2, 8, generator=g)


def _states(lse_fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    bad = torch.zeros(3, 2)
    bad[1, 1] = lse_fill
    return [(torch.randn(3, 2, 8), torch.zeros(3, 2)), (torch.randn(3, 2, 8), bad)]


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _rope_config(device: str | None = None, **fields: Any) -> kvfuse.RopeConfig:
    """RopeConfig(**fields) as a call of the bad-input runner (``device`` is not its)."""
    return kvfuse.RopeConfig(**fields)


def _mt(num_pages: int) -> torch.Tensor:
    """A non-contiguous pool view (pages with rows and heads swapped)."""
    return _t(num_pages, 2, 4, 8).transpose(1, 2)


def _overlapping_views() -> Call:
    """copy_pages where each dst pool is a contiguous view into its src pool's buffer, 3
    pages later: dst page 1 is src page 4."""
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(9, 4, 2, 8, generator=g), torch.randn(9, 4, 2, 8, generator=g)
    return kvfuse.copy_pages, (k[:6], v[:6], _i(4), k[3:], v[3:], _i(1)), {}


def _catalogue() -> dict[str, tuple[Callable[[], Call], type[kvfuse.KvfuseError], str]]:
    """name → (builder of the malformed call, expected error, argument it must name)."""
    fa, E = _attention, kvfuse
    kp, vp = _pool()
    dk, dv = _pool(3)
    rope = kvfuse.RopeConfig
    k4 = (_t(4, 1, 8), _t(4, 1, 8))
    return {
        "fusion_attention/q-rank": (lambda: fa(q=_t(3, 64)), E.ShapeError, "q"),
        "fusion_attention/q-int": (lambda: fa(q=torch.zeros(3, 4, 16, dtype=I32)), E.DTypeError, "q"),
        "fusion_attention/q-not-tensor": (lambda: fa(q=[[1.0]]), E.DTypeError, "q"),
        "fusion_attention/mixed-dtype": (lambda: fa(q=_t(3, 4, 16, dtype=torch.float16)), E.DTypeError, "k_pages"),
        "fusion_attention/head-dim": (lambda: fa(q=_t(3, 4, 32)), E.ShapeError, "k_pages"),
        "fusion_attention/gqa-ratio": (lambda: fa(q=_t(3, 3, 16)), E.InvalidValueError, "k_pages"),
        "fusion_attention/q-indptr-int64": (lambda: fa(q_indptr=torch.tensor([0, 2, 3])), E.DTypeError, "q_indptr"),
        "fusion_attention/q-indptr-batch": (lambda: fa(q_indptr=_i(0, 3)), E.ShapeError, "q_indptr"),
        "fusion_attention/q-indptr-end": (lambda: fa(q_indptr=_i(0, 2, 4)), E.IndexRangeError, "q_indptr"),
        "fusion_attention/q-pos-negative": (lambda: fa(q_pos=_i(45, -1, 3)), E.IndexRangeError, "q_pos"),
        "fusion_attention/q-pos-length": (lambda: fa(q_pos=_i(45, 46)), E.ShapeError, "q_pos"),
        "fusion_attention/page-out-of-range": (
            lambda: fa(**{"seg.page_indices": _i(8, 1, 6, 99, 0, 7)}),
            E.IndexRangeError,
            "segments.page_indices",
        ),
        "fusion_attention/seg-len-too-long": (
            lambda: fa(**{"seg.seg_len": _i(20, 9, 16)}),
            E.ShapeError,
            "segments.seg_len",
        ),
        "fusion_attention/seg-len-too-short": (
            lambda: fa(**{"seg.seg_len": _i(8, 5, 16)}),
            E.ShapeError,
            "segments.seg_len",
        ),
        "fusion_attention/seg-pos-negative": (
            lambda: fa(**{"seg.seg_pos": _i(40, -3, 0)}),
            E.IndexRangeError,
            "segments.seg_pos",
        ),
        "fusion_attention/seg-indptr-int64": (
            lambda: fa(**{"seg.seg_indptr": torch.tensor([0, 2, 3])}),
            E.DTypeError,
            "segments.seg_indptr",
        ),
        "fusion_attention/page-indptr-decreasing": (
            lambda: fa(**{"seg.page_indptr": _i(0, 3, 2, 6)}),
            E.IndexRangeError,
            "segments.page_indptr",
        ),
        "fusion_attention/segments-type": (lambda: fa(segments="pages"), E.InvalidValueError, "segments"),
        "fusion_attention/v-shape": (lambda: fa(v_pages=_t(5, 8, 2, 8)), E.ShapeError, "v_pages"),
        "fusion_attention/pool-non-contiguous": (
            lambda: fa(k_pages=_t(9, 2, 8, 16).transpose(1, 2)),
            E.ShapeError,
            "k_pages",
        ),
        "fusion_attention/softcap-negative": (lambda: fa(softcap=-1.0), E.InvalidValueError, "softcap"),
        "fusion_attention/sm-scale-zero": (lambda: fa(sm_scale=0.0), E.InvalidValueError, "sm_scale"),
        "fusion_attention/softcap-inf": (lambda: fa(softcap=math.inf), E.InvalidValueError, "softcap"),
        "fusion_attention/sm-scale-nan": (lambda: fa(sm_scale=math.nan), E.InvalidValueError, "sm_scale"),
        "fusion_attention/sm-scale-inf": (lambda: fa(sm_scale=math.inf), E.InvalidValueError, "sm_scale"),
        "fusion_attention/rope-theta-inf": (
            lambda: (_rope_config, (), {"theta": math.inf}),
            E.InvalidValueError,
            "rope.theta",
        ),
        "fusion_attention/window-float": (lambda: fa(window_left=1.5), E.InvalidValueError, "window_left"),
        "fusion_attention/rope-odd-dim": (lambda: fa(rope=rope(rotary_dim=7)), E.InvalidValueError, "rope.rotary_dim"),
        "fusion_attention/rope-q-past-table": (lambda: fa(rope=rope(max_position=46)), E.IndexRangeError, "q_pos"),
        "fusion_attention/rope-k-past-table": (
            lambda: fa(rope=rope(max_position=50)),
            E.InvalidValueError,
            "segments.seg_pos",
        ),
        "merge_states/nan-lse": (
            lambda: (kvfuse.merge_states, (_states(math.nan),), {}),
            E.InvalidValueError,
            "states[1].lse",
        ),
        "merge_states/pos-inf-lse": (
            lambda: (kvfuse.merge_states, (_states(math.inf),), {}),
            E.InvalidValueError,
            "states[1].lse",
        ),
        "merge_states/empty": (lambda: (kvfuse.merge_states, ([],), {}), E.InvalidValueError, "states"),
        "merge_states/lse-fp16": (
            lambda: (kvfuse.merge_states, ([(_t(3, 2, 8), torch.zeros(3, 2, dtype=torch.float16))],), {}),
            E.DTypeError,
            "states[0].lse",
        ),
        "merge_states/shape": (
            lambda: (kvfuse.merge_states, ([(_t(3, 2, 8), torch.zeros(3, 2)), (_t(3, 2, 4), torch.zeros(3, 2))],), {}),
            E.ShapeError,
            "states[1].out",
        ),
        "append_kv/slot-range": (
            lambda: (kvfuse.append_kv, (_t(2, 2, 8), _t(2, 2, 8), kp, vp, torch.tensor([3, 24])), {}),
            E.IndexRangeError,
            "slot_mapping",
        ),
        "append_kv/slot-duplicate": (
            lambda: (kvfuse.append_kv, (_t(3, 2, 8), _t(3, 2, 8), kp, vp, torch.tensor([3, -1, 3])), {}),
            E.IndexRangeError,
            "slot_mapping",
        ),
        "append_kv/slot-int32": (
            lambda: (kvfuse.append_kv, (_t(2, 2, 8), _t(2, 2, 8), kp, vp, _i(3, 4)), {}),
            E.DTypeError,
            "slot_mapping",
        ),
        "append_kv/heads": (
            lambda: (kvfuse.append_kv, (_t(2, 1, 8), _t(2, 1, 8), kp, vp, torch.tensor([3, 4])), {}),
            E.ShapeError,
            "k",
        ),
        "append_kv/dtype": (
            lambda: (kvfuse.append_kv, (_t(2, 2, 8).half(), _t(2, 2, 8).half(), kp, vp, torch.tensor([3, 4])), {}),
            E.DTypeError,
            "k",
        ),
        "gather_pages/range": (lambda: (kvfuse.gather_pages, (kp, vp, _i(0, 6)), {}), E.IndexRangeError, "page_ids"),
        "gather_pages/negative": (lambda: (kvfuse.gather_pages, (kp, vp, _i(-1)), {}), E.IndexRangeError, "page_ids"),
        "gather_pages/out-not-pair": (
            lambda: (kvfuse.gather_pages, (kp, vp, _i(1, 2, 3)), {"out": (_t(3, 4, 2, 8),)}),
            E.InvalidValueError,
            "out",
        ),
        "gather_pages/out-shape": (
            lambda: (kvfuse.gather_pages, (kp, vp, _i(1, 2, 3)), {"out": (_t(2, 4, 2, 8), _t(3, 4, 2, 8))}),
            E.ShapeError,
            "out[0]",
        ),
        "gather_pages/out-dtype": (
            lambda: (
                kvfuse.gather_pages,
                (kp, vp, _i(1, 2, 3)),
                {"out": (_t(3, 4, 2, 8), _t(3, 4, 2, 8, dtype=torch.float16))},
            ),
            E.DTypeError,
            "out[1]",
        ),
        "gather_pages/out-non-contiguous": (
            lambda: (
                kvfuse.gather_pages,
                (kp, vp, _i(1, 2, 3)),
                {"out": (_t(3, 4, 2, 8), _t(3, 2, 4, 8).transpose(1, 2))},
            ),
            E.ShapeError,
            "out[1]",
        ),
        "gather_pages/out-is-the-pool": (
            lambda: (kvfuse.gather_pages, (kp, vp, _i(5, 4, 3, 2, 1, 0)), {"out": (kp, _t(6, 4, 2, 8))}),
            E.InvalidValueError,
            "out[0]",
        ),
        "gather_pages/ids-int64": (
            lambda: (kvfuse.gather_pages, (kp, vp, torch.tensor([1])), {}),
            E.DTypeError,
            "page_ids",
        ),
        "scatter_pages/duplicate": (
            lambda: (kvfuse.scatter_pages, (_t(2, 4, 2, 8), _t(2, 4, 2, 8), kp, vp, _i(1, 1)), {}),
            E.IndexRangeError,
            "page_ids",
        ),
        "scatter_pages/buf-shape": (
            lambda: (kvfuse.scatter_pages, (_t(2, 4, 2, 8), _t(2, 4, 2, 8), kp, vp, _i(1, 2, 3)), {}),
            E.ShapeError,
            "k_buf",
        ),
        "copy_pages/geometry": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0), _t(3, 8, 2, 8), _t(3, 8, 2, 8), _i(0)), {}),
            E.ShapeError,
            "dst_k",
        ),
        "copy_pages/dtype": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0), dk.half(), dv.half(), _i(0)), {}),
            E.DTypeError,
            "dst_k",
        ),
        "copy_pages/dst-duplicate": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0, 1), dk, dv, _i(2, 2)), {}),
            E.IndexRangeError,
            "dst_ids",
        ),
        "copy_pages/lengths": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0, 1), dk, dv, _i(2)), {}),
            E.ShapeError,
            "dst_ids",
        ),
        "copy_pages/dst-range": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0), dk, dv, _i(3)), {}),
            E.IndexRangeError,
            "dst_ids",
        ),
        "copy_pages/views-overlap": (  # page 1 of the dst view is page 4 of the src view
            _overlapping_views,
            E.IndexRangeError,
            "dst_ids",
        ),
        "copy_pages/dst-k-is-dst-v": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0), dk, dk, _i(1)), {}),
            E.InvalidValueError,
            "dst_v",
        ),
        "copy_pages/dst-non-contiguous": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0), _mt(3), dv, _i(1)), {}),
            E.ShapeError,
            "dst_k",
        ),
        "append_kv/pool-non-contiguous": (
            lambda: (kvfuse.append_kv, (_t(2, 2, 8), _t(2, 2, 8), kp, _mt(6), _s(3, 4)), {}),
            E.ShapeError,
            "v_pages",
        ),
        "scatter_pages/pool-non-contiguous": (
            lambda: (kvfuse.scatter_pages, (_t(1, 4, 2, 8), _t(1, 4, 2, 8), kp, _mt(6), _i(1)), {}),
            E.ShapeError,
            "v_pages",
        ),
        "copy_pages/same-pool-overlap": (
            lambda: (kvfuse.copy_pages, (kp, vp, _i(0, 1), kp, vp, _i(1, 2)), {}),
            E.IndexRangeError,
            "dst_ids",
        ),
        "rope_rerotate/pos-past-table": (
            lambda: (kvfuse.rope_rerotate, (_t(2, 1, 8), _i(0, 1), _i(0, 10), rope(max_position=10)), {}),
            E.IndexRangeError,
            "new_pos",
        ),
        "rope_rerotate/pos-length": (
            lambda: (kvfuse.rope_rerotate, (_t(2, 1, 8), _i(0), _i(0, 1), rope()), {}),
            E.ShapeError,
            "old_pos",
        ),
        "blend_select/ratio": (lambda: (kvfuse.blend_select, (*k4, 1.5), {}), E.InvalidValueError, "ratio"),
        "blend_select/shape": (
            lambda: (kvfuse.blend_select, (_t(4, 1, 8), _t(5, 1, 8), 0.5), {}),
            E.ShapeError,
            "k_fresh",
        ),
        "blend_select/always-range": (
            lambda: (kvfuse.blend_select, (*k4, 0.5), {"always": torch.tensor([4])}),
            E.IndexRangeError,
            "always",
        ),
    }


CATALOGUE = _catalogue()


def bad_input_cases() -> list[Case]:
    profiles = frozenset({"smoke", "standard", "full"})
    return [
        Case(f"bad_input/{name}", name.split("/")[0], "bad_input", {"name": name}, "exact", profiles)
        for name in CATALOGUE
    ]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, kvfuse.SegmentTable):
        return [obj.seg_indptr, obj.page_indptr, obj.page_indices, obj.seg_len, obj.seg_pos]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return _tensors(list(obj.values()))
    return []


def run_bad_input(case: Case, device: str, tdev: torch.device) -> None:
    """Raise AssertionError-like failures (via ``_Fail``) unless the call, with its tensors
    on ``tdev``, behaves."""
    from kvfuse.conformance._execute import _Fail
    from kvfuse.conformance._inputs import place

    build, err, arg = CATALOGUE[case.params["name"]]
    fn, args, kwargs = build()
    args, kwargs = place((args, kwargs), tdev)
    tensors = _tensors([args, kwargs])
    before = [t.clone() for t in tensors]
    try:
        fn(*args, device=device, **kwargs)
    except err as exc:
        if isinstance(exc, kvfuse.ContractError) and exc.argument != arg:
            raise _Fail(f"{type(exc).__name__} names argument {exc.argument!r}, expected {arg!r}") from exc
    except Exception as exc:
        raise _Fail(f"expected {err.__name__} naming {arg!r}, got {type(exc).__name__}: {exc}") from exc
    else:
        raise _Fail(f"expected {err.__name__} naming {arg!r}; the call succeeded")
    for i, (t, b) in enumerate(zip(tensors, before)):
        if not torch.equal(
            t.view(torch.uint8) if t.is_floating_point() else t, b.view(torch.uint8) if b.is_floating_point() else b
        ):
            raise _Fail(f"tensor {i} of the call changed although the call was rejected")
