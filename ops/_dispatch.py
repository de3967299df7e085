"""Dispatch of a validated call to a device, with vendor exceptions translated."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from kvfuse._device import Requirement
from kvfuse._errors import DeviceError, KvfuseError
from kvfuse._registry import registry

_local = threading.local()


@contextlib.contextmanager
def ungated() -> Iterator[None]:
    """Within this block, calls naming a device skip the capability gate and reach the
    device's method directly (arguments are still validated). The conformance suite uses
    it to check that a device refuses what it does not declare."""
    _local.ungated = True
    try:
        yield
    finally:
        _local.ungated = False


def run(op: str, req: Requirement, tensor_device: torch.device, device: str | None, *args: Any, **kwargs: Any) -> Any:
    """Pick the device for ``req`` and call its ``op``. Exceptions that are not kvfuse
    errors are raised as :class:`DeviceError` from the vendor's exception."""
    if device is not None and getattr(_local, "ungated", False):
        dev = registry().get(device)
    else:
        dev = registry().select(req, tensor_device, device)
    try:
        return getattr(dev, op)(*args, **kwargs)
    except KvfuseError:
        raise
    except Exception as exc:
        raise DeviceError(f"device {dev.name!r} failed in {op}: {type(exc).__name__}: {exc}") from exc
