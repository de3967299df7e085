"""blend_select: CacheBlend token selection.

Score per token = sum over heads and head_dim of ``(k_fresh - k_stored)**2`` in fp32; the
``ceil(ratio * num_tokens)`` highest-scoring tokens (ties → lower index), plus ``always``,
deduplicated and sorted ascending, int64.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from kvfuse._device import Requirement, dtype_name
from kvfuse.ops import _checks as check

LAYOUT = ["num_tokens", "num_kv_heads", "head_dim"]


def check_blend_select(
    k_stored: torch.Tensor, k_fresh: torch.Tensor, ratio: float, always: torch.Tensor | None
) -> tuple[Requirement, int]:
    """Validate a call; returns what it needs from a device and how many tokens the ratio
    selects. ``always`` may be int32 or int64."""
    check.shape("k_stored", k_stored, LAYOUT)
    check.floating("k_stored", k_stored)
    check.shape("k_fresh", k_fresh, LAYOUT, tuple(k_stored.shape))
    check.same_dtype("k_fresh", k_fresh, "k_stored", k_stored)
    check.on_device("k_fresh", k_fresh, k_stored.device, "k_stored")
    value = check.number("ratio", ratio, lo=0.0, hi=1.0)
    if always is not None:
        check.shape("always", always, ["n"])
        check.dtype("always", always, (torch.int32, torch.int64))
        check.on_device("always", always, k_stored.device, "k_stored")
        check.index_range("always", always, 0, k_stored.shape[0])
    req = Requirement(op="blend_select", dtype=dtype_name(k_stored.dtype), head_dim=k_stored.shape[2])
    return req, blend_count(k_stored.shape[0], value)


def blend_count(num_tokens: int, ratio: float) -> int:
    """How many tokens the ratio selects: ``ceil(ratio * num_tokens)``.

    The ratio is read as the decimal it was written as (0.15 → 3/20), so binary rounding
    cannot add a token: ``0.15 * 100`` is 15.000000000000002 in floats, but selects 15.
    """
    exact = Fraction(ratio).limit_denominator(10**9)
    return min(num_tokens, math.ceil(exact * num_tokens))


def blend_select_reference(
    k_stored: torch.Tensor, k_fresh: torch.Tensor, count: int, always: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference; ``count = blend_count(num_tokens, ratio)``. Returns indices: [n], int64, ascending."""
    diff = k_fresh.float() - k_stored.float()
    score = (diff * diff).sum(dim=(1, 2))  # fp32, per token
    order = torch.sort(score, descending=True, stable=True).indices  # stable: ties → lower index
    picked = order[:count]
    if always is not None:
        picked = torch.cat([picked, always.long()])
    result: torch.Tensor = torch.unique(picked)  # sorted, deduplicated
    return result
