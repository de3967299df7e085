"""The layout section: any tensor argument other than a pool may be a strided view, and the
call must give exactly (bit for bit) what it gives on the view's contiguous copy, on the
device's own torch device. Pools must be contiguous (the bad-input section checks that
each non-contiguous pool is refused naming it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kvfuse
import torch
from kvfuse.conformance._cases import Case

Call = tuple[Callable[..., Any], dict[str, Any]]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pool(num_pages: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = _g(seed)
    return torch.randn(num_pages, 4, 2, 8, generator=g), torch.randn(num_pages, 4, 2, 8, generator=g)


def _i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def _attention() -> Call:
    from kvfuse.conformance._badinput import _attention as valid

    fn, _, kw = valid()
    kw["rope"] = kvfuse.RopeConfig(max_position=64)
    return fn, kw


def _calls() -> dict[str, Callable[[], Call]]:
    g = _g(3)
    k3 = torch.randn(5, 2, 16, generator=g)
    rope = kvfuse.RopeConfig(max_position=64)
    return {
        "fusion_attention": _attention,
        "merge_states": lambda: (
            kvfuse.merge_states,
            {
                "states": [
                    (torch.randn(3, 2, 16, generator=_g(4 + i)), torch.randn(3, 2, generator=_g(i))) for i in (0, 1)
                ]
            },
        ),
        "rope_rerotate": lambda: (
            kvfuse.rope_rerotate,
            {"k": k3.clone(), "old_pos": _i32(1, 9, 3, 0, 60), "new_pos": _i32(7, 2, 3, 33, 1), "rope": rope},
        ),
        "blend_select": lambda: (
            kvfuse.blend_select,
            {"k_stored": k3.clone(), "k_fresh": k3 * 1.5 + 0.1, "ratio": 0.4, "always": torch.tensor([4, 0])},
        ),
        "append_kv": lambda: (
            kvfuse.append_kv,
            {
                "k": torch.randn(3, 2, 8, generator=_g(6)),
                "v": torch.randn(3, 2, 8, generator=_g(7)),
                **dict(zip(("k_pages", "v_pages"), _pool())),
                "slot_mapping": torch.tensor([17, -1, 2]),
            },
        ),
        "gather_pages": lambda: (
            kvfuse.gather_pages,
            {**dict(zip(("k_pages", "v_pages"), _pool())), "page_ids": _i32(5, 0, 5, 2)},
        ),
        "scatter_pages": lambda: (
            kvfuse.scatter_pages,
            {
                **dict(zip(("k_buf", "v_buf"), _pool(2, 8))),
                **dict(zip(("k_pages", "v_pages"), _pool())),
                "page_ids": _i32(4, 1),
            },
        ),
        "copy_pages": lambda: (
            kvfuse.copy_pages,
            {
                **dict(zip(("src_k", "src_v"), _pool())),
                "src_ids": _i32(0, 5, 5),
                **dict(zip(("dst_k", "dst_v"), _pool(4, 9))),
                "dst_ids": _i32(3, 0, 1),
            },
        ),
    }


# the non-pool tensor arguments of each op ("states.0.1": the lse of state 0)
ARGS = {
    "fusion_attention": [
        "q",
        "q_indptr",
        "q_pos",
        "segments.page_indices",
        "segments.seg_len",
        "segments.seg_pos",
    ],
    "merge_states": ["states.0.0", "states.1.1"],
    "rope_rerotate": ["k", "old_pos", "new_pos"],
    "blend_select": ["k_stored", "k_fresh", "always"],
    "append_kv": ["k", "v", "slot_mapping"],
    "gather_pages": ["page_ids"],
    "scatter_pages": ["k_buf", "v_buf", "page_ids"],
    "copy_pages": ["src_ids", "dst_ids"],
}


def layout_cases() -> list[Case]:
    profiles = frozenset({"smoke", "standard", "full"})
    return [
        Case(f"layout/{op}/{arg}", op, "layout", {"arg": arg}, "exact", profiles)
        for op, args in ARGS.items()
        for arg in args
    ]


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]


def _replace(kw: dict[str, Any], path: str) -> None:
    """Swap the tensor at ``path`` (``name``, ``segments.field`` or ``states.i.j``) for its
    strided view."""
    head, _, rest = path.partition(".")
    if head == "segments":
        seg = kw["segments"]
        fields = {f: getattr(seg, f) for f in ("seg_indptr", "page_indptr", "page_indices", "seg_len", "seg_pos")}
        fields[rest] = strided(fields[rest])
        kw["segments"] = kvfuse.SegmentTable(**fields)
    elif head == "states":
        i, j = (int(x) for x in rest.split("."))
        pair = list(kw["states"][i])
        pair[j] = strided(pair[j])
        kw["states"][i] = tuple(pair)
    else:
        kw[head] = strided(kw[head])


def _outputs(result: Any, kw: dict[str, Any]) -> list[torch.Tensor]:
    """What a call produced: its returned tensors, then every pool it may have written."""
    if isinstance(result, kvfuse.TransferHandle):
        result.wait(timeout=60)
        result = None
    got = [result] if isinstance(result, torch.Tensor) else [t for t in (result or ()) if isinstance(t, torch.Tensor)]
    return got + [kw[n] for n in ("k_pages", "v_pages", "dst_k", "dst_v") if n in kw]


def run_layout(case: Case, device: str, tdev: torch.device) -> str | None:
    """None if the view gives the contiguous copy's bits; the missing capability if the
    device does not declare the call at all (the case is then not applicable)."""
    from kvfuse.conformance._execute import _exact, _Fail
    from kvfuse.conformance._inputs import place

    op, arg = case.op, case.params["arg"]
    results = []
    for view in (False, True):
        fn, kw = _calls()[op]()
        if view:
            _replace(kw, arg)
        kw = place(kw, tdev)
        if view and not _is_view(kw, arg):
            raise _Fail(f"test setup: {arg} is not a strided view on {tdev}")
        try:
            results.append(_outputs(fn(**kw, device=device), kw))
        except kvfuse.UnsupportedError as exc:
            if view:
                raise _Fail(f"refused the call with {arg} a view, accepted it without: {exc}") from exc
            return exc.missing
    base, got = results
    if len(base) != len(got):
        raise _Fail(f"{len(got)} outputs with {arg} a view, {len(base)} without")
    for i, (a, b) in enumerate(zip(got, base)):
        try:
            _exact(f"output {i} with {arg} a strided view", a, b.detach().cpu())
        except _Fail as exc:
            raise _Fail(f"{exc} (a view must give exactly what its contiguous copy gives)") from None
    return None


def _is_view(kw: dict[str, Any], path: str) -> bool:
    head, _, rest = path.partition(".")
    if head == "segments":
        t = getattr(kw["segments"], rest)
    elif head == "states":
        i, j = (int(x) for x in rest.split("."))
        t = kw["states"][i][j]
    else:
        t = kw[head]
    return bool(t.numel() < 2 or not t.is_contiguous())
