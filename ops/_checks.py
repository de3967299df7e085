"""Argument checks shared by the op modules. Each raises a kvfuse ContractError naming the
argument, the expectation and what was received. None of them writes anything."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kvfuse._device import DTYPE_NAMES, dtype_name
from kvfuse._errors import (
    DeviceMismatchError,
    DTypeError,
    IndexRangeError,
    InvalidValueError,
    ShapeError,
)

FLOAT_DTYPES = tuple(DTYPE_NAMES)

# CONTRACTS.md "Tolerances": dtype → ((out atol, rtol), (lse atol, rtol)); moves are exact
TOLERANCES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "fp32": ((1e-5, 1e-5), (1e-5, 1e-5)),
    "fp16": ((1e-2, 1e-3), (1e-3, 1e-3)),
    "bf16": ((1.5e-2, 1e-2), (1e-3, 1e-2)),
    "exact": ((0.0, 0.0), (0.0, 0.0)),
}


def tensor(name: str, x: object) -> torch.Tensor:
    """``x`` itself if it is a tensor."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(name, "a torch.Tensor", type(x).__name__)
    return x


def shape(name: str, x: object, layout: Sequence[str], sizes: Sequence[int | None] = ()) -> torch.Tensor:
    """A tensor of rank ``len(layout)`` whose dims equal ``sizes`` where given (None: any)."""
    t = tensor(name, x)
    want = "[" + ", ".join(layout) + "]"
    if t.dim() != len(layout):
        raise ShapeError(name, f"a {len(layout)}-d tensor {want}", f"shape {tuple(t.shape)}")
    for i, (dim, size) in enumerate(zip(layout, sizes)):
        if size is not None and t.shape[i] != size:
            raise ShapeError(name, f"{want} with {dim} = {size}", f"shape {tuple(t.shape)}")
    return t


def floating(name: str, t: torch.Tensor) -> torch.dtype:
    if t.dtype not in FLOAT_DTYPES:
        raise DTypeError(name, "dtype fp32, fp16 or bf16", dtype_name(t.dtype))
    return t.dtype


def dtype(name: str, t: torch.Tensor, want: torch.dtype | Sequence[torch.dtype]) -> None:
    wants = (want,) if isinstance(want, torch.dtype) else tuple(want)
    if t.dtype not in wants:
        expected = " or ".join(dtype_name(w) for w in wants)
        raise DTypeError(name, f"dtype {expected}", dtype_name(t.dtype))


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise DTypeError(name, f"dtype {dtype_name(ref.dtype)} (same as {ref_name})", dtype_name(t.dtype))


def on_device(name: str, t: torch.Tensor, device: torch.device, ref_name: str) -> None:
    if t.device != device:
        raise DeviceMismatchError(name, f"a tensor on {device} (same as {ref_name})", str(t.device))


def contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ShapeError(name, "a contiguous tensor", f"strides {tuple(t.stride())}")


def host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy (or the tensor itself) for value checks."""
    return t if t.device.type == "cpu" else t.cpu()


def index_range(name: str, values: torch.Tensor, lo: int, hi: int) -> None:
    """Every value in ``[lo, hi)``; names the first offender and its position."""
    v = host(values)
    bad = ((v < lo) | (v >= hi)).nonzero()
    if bad.numel():
        i = int(bad[0, 0]) if bad.dim() > 1 else int(bad[0])
        raise IndexRangeError(name, f"values in [{lo}, {hi})", f"{int(v.reshape(-1)[i])} at index {i}")


def unique(name: str, values: torch.Tensor) -> None:
    """No value repeated; names the first repeated value."""
    v = host(values).reshape(-1)
    if v.numel() < 2:
        return
    sorted_v, _ = torch.sort(v)
    dup = (sorted_v[1:] == sorted_v[:-1]).nonzero()
    if dup.numel():
        raise IndexRangeError(name, "unique values", f"{int(sorted_v[int(dup[0, 0])])} repeated")


def non_decreasing(name: str, values: torch.Tensor, first: int, last: int) -> None:
    """An indptr array: starts at ``first``, ends at ``last``, never decreases."""
    v = host(values)
    if int(v[0]) != first or int(v[-1]) != last:
        raise IndexRangeError(name, f"an indptr from {first} to {last}", f"{int(v[0])} .. {int(v[-1])}")
    if v.numel() > 1:
        drops = ((v[1:] - v[:-1]) < 0).nonzero()
        if drops.numel():
            i = int(drops[0, 0])
            raise IndexRangeError(name, "non-decreasing values", f"{int(v[i])} then {int(v[i + 1])} at index {i}")


def number(name: str, x: object, *, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number within ``[lo, hi]`` (NaN and ±inf are contract errors)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InvalidValueError(name, "a number", type(x).__name__)
    value = float(x)
    if not math.isfinite(value):
        raise InvalidValueError(name, "a finite number", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise InvalidValueError(name, f"a number in {span}", value)
    return value
