"""merge_states: combine attention states computed over disjoint key sets.

``lse = logsumexp_i(lse_i)``, ``out = sum_i exp(lse_i - lse) * out_i``; all ``-inf`` gives
``out = 0``, ``lse = -inf``. NaN or ``+inf`` in an input lse is a contract error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kvfuse._device import Requirement, dtype_name
from kvfuse._errors import InvalidValueError
from kvfuse.ops import _checks as check

State = tuple[torch.Tensor, torch.Tensor]


def check_merge_states(states: Sequence[State]) -> Requirement:
    """Validate a call; returns what it needs from a device."""
    if isinstance(states, (str, bytes)) or not isinstance(states, Sequence) or len(states) == 0:
        raise InvalidValueError("states", "a non-empty sequence of (out, lse) pairs", type(states).__name__)
    first: torch.Tensor | None = None
    for i, pair in enumerate(states):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidValueError(f"states[{i}]", "an (out, lse) pair", type(pair).__name__)
        out = check.shape(f"states[{i}].out", pair[0], ["num_q_tokens", "num_q_heads", "head_dim"])
        check.floating(f"states[{i}].out", out)
        if first is None:
            first = out
        else:
            check.shape(f"states[{i}].out", out, ["num_q_tokens", "num_q_heads", "head_dim"], tuple(first.shape))
            check.same_dtype(f"states[{i}].out", out, "states[0].out", first)
            check.on_device(f"states[{i}].out", out, first.device, "states[0].out")
        lse = check.shape(f"states[{i}].lse", pair[1], ["num_q_tokens", "num_q_heads"], tuple(out.shape[:2]))
        check.dtype(f"states[{i}].lse", lse, torch.float32)
        check.on_device(f"states[{i}].lse", lse, out.device, "states[0].out")
        bad = (lse.isnan() | (lse == float("inf"))).nonzero()
        if bad.numel():
            t, h = (int(x) for x in bad[0])
            raise InvalidValueError(f"states[{i}].lse", "finite values or -inf", f"{float(lse[t, h])} at [{t}, {h}]")
    assert first is not None
    return Requirement(op="merge_states", dtype=dtype_name(first.dtype), head_dim=first.shape[2])


def merge_states_reference(states: Sequence[State]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference. Returns out [num_q_tokens, num_q_heads, head_dim] and
    lse [num_q_tokens, num_q_heads], both float64."""
    lses = torch.stack([lse.double() for _, lse in states])  # [n, tokens, heads]
    outs = torch.stack([out.double() for out, _ in states])
    lse = torch.logsumexp(lses, dim=0)
    weight = torch.exp(lses - lse).nan_to_num(nan=0.0)  # -inf - -inf → 0
    return (weight[..., None] * outs).sum(dim=0), lse
