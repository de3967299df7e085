from __future__ import annotations

import math

import kvfuse
import pytest
import torch
from kvcases import TOL, assert_close_lse


def _dense_merge(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element, from the definition."""
    out0 = states[0][0]
    out = torch.zeros(out0.shape, dtype=torch.float64)
    lse = torch.full(out0.shape[:2], -math.inf, dtype=torch.float64)
    for t in range(out0.shape[0]):
        for h in range(out0.shape[1]):
            ls = [float(s[1][t, h]) for s in states]
            m = max(ls)
            if m == -math.inf:
                continue
            total = sum(math.exp(x - m) for x in ls)
            lse[t, h] = m + math.log(total)
            for (o, _), x in zip(states, ls):
                out[t, h] += math.exp(x - float(lse[t, h])) * o[t, h].double()
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_merge_matches_definition(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    states = []
    for i in range(n):
        out = torch.randn(6, 4, 32, generator=g).to(dtype)
        lse = (torch.randn(6, 4, generator=g) * 3).float()
        lse[i, :] = -math.inf  # some rows empty in some states
        lse[5, :] = -math.inf  # row 5 empty everywhere
        states.append((out, lse))
    out, lse = kvfuse.merge_states(states, device="reference")
    ref_out, ref_lse = _dense_merge(states)
    assert out.dtype == dtype and lse.dtype == torch.float32
    (oa, orr), (la, lr) = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=oa, rtol=orr)
    assert_close_lse(lse, ref_lse, la, lr)
    assert torch.all(out[5] == 0) and torch.isneginf(lse[5]).all()
