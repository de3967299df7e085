from __future__ import annotations

import math

import kvfuse
import torch
from kvfuse.ops import blend_count


def test_selects_top_deviation_plus_always() -> None:
    g = torch.Generator().manual_seed(0)
    stored = torch.randn(40, 2, 8, generator=g)
    fresh = stored.clone()
    hot = [3, 17, 29, 31]
    fresh[hot] += torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None, None]  # decreasing deviation
    fresh += 1e-3 * torch.randn(40, 2, 8, generator=g)
    got = kvfuse.blend_select(stored, fresh, 0.1, always=torch.tensor([39, 3, 0]), device="reference")
    assert got.dtype == torch.int64
    assert got.tolist() == [0, 3, 17, 29, 31, 39]  # ceil(0.1 * 40) = 4 hot tokens + always


def test_ties_go_to_lower_index() -> None:
    stored = torch.zeros(10, 1, 4)
    fresh = torch.zeros(10, 1, 4)
    fresh[[2, 5, 8]] = 1.0  # three equal scores, two picked
    got = kvfuse.blend_select(stored, fresh, 0.2, device="reference")
    assert got.tolist() == [2, 5]


def test_count_is_decimal_ceil() -> None:
    assert blend_count(100, 0.15) == 15  # 0.15 * 100 == 15.000000000000002 in binary floats
    assert blend_count(7, 0.15) == math.ceil(1.05) == 2
    assert blend_count(5, 0.0) == 0 and blend_count(5, 1.0) == 5
