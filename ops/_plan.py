"""Plan / run (CONTRACTS.md: "Plan / run"): validate, flatten and pick the device once per
forward step, then run per layer with metadata checks only (no host synchronisation).

    plan = kvfuse.plan_attention(q_indptr, q_pos, segments, k_pages, v_pages, num_q_heads=32, rope=rope)
    for layer in layers:
        out, lse = plan.run(q, k_pages[layer], v_pages[layer])

A plan captures the values of its index tensors: change them and make a new plan. A
planned run calls the device with exactly the arguments of the one-shot call, so its
results are bit-identical (the conformance suite checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from kvfuse._device import Device
from kvfuse._errors import DeviceMismatchError, DTypeError, InvalidValueError, ShapeError
from kvfuse._registry import registry
from kvfuse.ops import _checks as check
from kvfuse.ops._attention import check_fusion_attention
from kvfuse.ops._dispatch import call
from kvfuse.ops._moves import check_append_kv
from kvfuse.ops._rope import RopeConfig
from kvfuse.ops._segments import FlatSegments, SegmentTable

T = TypeVar("T")


class _Planned(SegmentTable):
    """A segment table whose flattening was done by the plan, and which keeps what devices
    derive from it (``memo``): a planned run pays for neither again."""

    _flat: FlatSegments
    _page_size: int
    _memo: dict[tuple[object, ...], tuple[tuple[object, ...], Any]]
    _carried: dict[object, Any]
    _last: list[Any]  # [key, tensor versions, result] of the last memo lookup

    def flatten(self, page_size: int) -> FlatSegments:
        if page_size == self._page_size:
            return self._flat
        return super().flatten(page_size)

    def memo(self, key: tuple[object, ...], make: Callable[[], T]) -> T:
        last = self._last  # the same objects as the last lookup: every layer's run
        if last and len(last[0]) == len(key) and all(a is b for a, b in zip(last[0], key)):
            if all(x._version == v for x, v in last[1]):
                hit: T = last[2]
                return hit
        ident = tuple((id(x), x._version) if isinstance(x, torch.Tensor) else x for x in key)
        held = self._memo.get(ident)
        if held is None:  # the entry keeps key's tensors alive, so their ids stay theirs
            held = self._memo[ident] = (key, make())
        result: T = held[1]
        versions = [(x, x._version) for x in key if isinstance(x, torch.Tensor)]
        self._last[:] = [key, versions, result]
        return result

    def carried(self) -> dict[object, Any]:
        return self._carried


def _planned(segments: SegmentTable, page_size: int, carried: dict[object, Any]) -> _Planned:
    dense = segments.contiguous()
    table = _Planned(dense.seg_indptr, dense.page_indptr, dense.page_indices, dense.seg_len, dense.seg_pos)
    object.__setattr__(table, "_page_size", page_size)
    object.__setattr__(table, "_flat", dense.flatten(page_size))
    object.__setattr__(table, "_memo", {})
    object.__setattr__(table, "_carried", carried)
    object.__setattr__(table, "_last", [])
    return table


def _like(
    name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, pool: bool = False
) -> torch.Tensor:
    """A tensor of the plan's shape, dtype and device (a contiguous one for a pool):
    metadata checks only, each a typed error naming ``name``."""
    x = check.tensor(name, t)
    if tuple(x.shape) != shape:
        raise ShapeError(name, f"the plan's shape {shape}", f"shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise DTypeError(name, f"the plan's dtype {dtype}", str(x.dtype))
    if x.device != device:
        raise DeviceMismatchError(name, f"a tensor on the plan's device {device}", str(x.device))
    if pool:
        check.contiguous(name, x)
    return x


@dataclass(frozen=True)
class AttentionPlan:
    """``fusion_attention`` with everything but q and the pools fixed (see the module)."""

    device: Device
    q_indptr: torch.Tensor
    q_pos: torch.Tensor
    segments: SegmentTable
    q_shape: tuple[int, int, int]
    pool_shape: tuple[int, int, int, int]
    dtype: torch.dtype
    torch_device: torch.device
    kwargs: dict[str, Any]

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer: ``(out, lse)`` as :func:`kvfuse.fusion_attention` returns them.

        q: [num_q_tokens, num_q_heads, head_dim], the plan's dtype
        k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim], the plan's dtype, contiguous
        """
        q = _like("q", q, self.q_shape, self.dtype, self.torch_device)
        k = _like("k_pages", k_pages, self.pool_shape, self.dtype, self.torch_device, pool=True)
        v = _like("v_pages", v_pages, self.pool_shape, self.dtype, self.torch_device, pool=True)
        args = (q.contiguous(), self.q_indptr, self.q_pos, k, v, self.segments)
        result: tuple[torch.Tensor, torch.Tensor] = call(self.device, "fusion_attention", *args, **self.kwargs)
        return result


def plan_attention(
    q_indptr: torch.Tensor,
    q_pos: torch.Tensor,
    segments: SegmentTable,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    *,
    num_q_heads: int,
    causal: bool = True,
    sm_scale: float | None = None,
    softcap: float = 0.0,
    window_left: int = -1,
    rope: RopeConfig | None = None,
    device: str | None = None,
    extends: AttentionPlan | None = None,
) -> AttentionPlan:
    """Validate and flatten a ``fusion_attention`` call once, and pick its device; the
    pools give the geometry every run's pools must have.

    ``extends``: the previous step's plan of the same requests (decode: each request's
    keys are the previous plan's followed by new ones). The caller promises that the pool
    rows the previous plan's keys sit in have not been written since (pinned or owned
    pages; only new rows appended), so a device may keep per-layer work on those keys
    (gathered, rotated) instead of redoing it every step. Where the new keys do not
    extend the old ones (other slots or positions), the device recomputes: results are
    bit-identical to the one-shot call either way.

    q_indptr: [batch + 1], int32
    q_pos: [num_q_tokens], int32
    k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim], fp32/fp16/bf16, contiguous
    """
    pool = check.tensor("k_pages", k_pages)
    pos = check.tensor("q_pos", q_pos)
    if pool.dim() != 4 or pos.dim() != 1:
        check.shape("k_pages", pool, ["num_pages", "page_size", "num_kv_heads", "head_dim"])
        check.shape("q_pos", pos, ["num_q_tokens"])
    q_shape = (int(pos.shape[0]), int(num_q_heads), int(pool.shape[3]))
    q_meta = torch.empty_strided(q_shape, (0, 0, 0), dtype=pool.dtype, device=pool.device)
    req, scale = check_fusion_attention(
        q_meta,
        q_indptr,
        q_pos,
        k_pages,
        v_pages,
        segments,
        causal=causal,
        sm_scale=sm_scale,
        softcap=softcap,
        window_left=window_left,
        rope=rope,
    )
    dev = registry().select(req, pool.device, device)
    kwargs = {"causal": causal, "sm_scale": scale, "softcap": float(softcap), "window_left": window_left, "rope": rope}
    carried: dict[object, Any] = {}
    if extends is not None:
        if not isinstance(extends, AttentionPlan):
            raise InvalidValueError("extends", "an AttentionPlan", type(extends).__name__)
        same = (extends.device, extends.pool_shape, extends.dtype, extends.torch_device, extends.kwargs)
        if same != (dev, tuple(pool.shape), pool.dtype, pool.device, kwargs):
            raise InvalidValueError(
                "extends", "a plan with this plan's device, pool geometry, dtype and attention settings", "another"
            )
        previous = extends.segments.carried()
        carried = previous if previous is not None else {}
        carried["chained"] = True  # devices keep work for later steps only once a chain exists
    return AttentionPlan(
        dev,
        q_indptr.contiguous(),
        q_pos.contiguous(),
        _planned(segments, int(pool.shape[1]), carried),
        q_shape,
        tuple(int(x) for x in pool.shape),  # type: ignore[arg-type]
        pool.dtype,
        pool.device,
        kwargs,
    )


@dataclass(frozen=True)
class AppendPlan:
    """``append_kv`` with the slot mapping validated once."""

    device: Device
    slot_mapping: torch.Tensor
    kv_shape: tuple[int, int, int]
    pool_shape: tuple[int, int, int, int]
    dtype: torch.dtype
    torch_device: torch.device

    def run(self, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        """One layer's write, as :func:`kvfuse.append_kv`.

        k, v: [num_tokens, num_kv_heads, head_dim], the plan's dtype
        k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim], the plan's dtype, contiguous
        """
        k = _like("k", k, self.kv_shape, self.dtype, self.torch_device)
        v = _like("v", v, self.kv_shape, self.dtype, self.torch_device)
        kp = _like("k_pages", k_pages, self.pool_shape, self.dtype, self.torch_device, pool=True)
        vp = _like("v_pages", v_pages, self.pool_shape, self.dtype, self.torch_device, pool=True)
        call(self.device, "append_kv", k.contiguous(), v.contiguous(), kp, vp, self.slot_mapping)


def plan_append(
    slot_mapping: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    *,
    device: str | None = None,
) -> AppendPlan:
    """Validate ``slot_mapping`` once (range, uniqueness) for runs of ``append_kv`` into
    pools of ``k_pages``'s geometry.

    slot_mapping: [num_tokens], int64
    """
    pool = check.tensor("k_pages", k_pages)
    slots = check.tensor("slot_mapping", slot_mapping)
    if pool.dim() != 4 or slots.dim() != 1:
        check.shape("k_pages", pool, ["num_pages", "page_size", "num_kv_heads", "head_dim"])
        check.shape("slot_mapping", slots, ["num_tokens"])
    kv_shape = (int(slots.shape[0]), int(pool.shape[2]), int(pool.shape[3]))
    meta = torch.empty_strided(kv_shape, (0, 0, 0), dtype=pool.dtype, device=pool.device)
    req = check_append_kv(meta, meta, k_pages, v_pages, slot_mapping)
    dev = registry().select(req, pool.device, device)
    return AppendPlan(
        dev,
        slots.contiguous(),
        kv_shape,
        tuple(int(x) for x in pool.shape),  # type: ignore[arg-type]
        pool.dtype,
        pool.device,
    )
