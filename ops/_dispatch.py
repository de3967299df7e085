"""Dispatch of a validated call to a device, with vendor exceptions translated."""

from __future__ import annotations

from typing import Any

import torch
from kvfuse._device import Device, Requirement
from kvfuse._errors import DeviceError, KvfuseError
from kvfuse._registry import registry


def call(dev: Device, op: str, *args: Any, **kwargs: Any) -> Any:
    """``dev.<op>(...)``; exceptions that are not kvfuse errors are raised as
    :class:`DeviceError` from the vendor's exception."""
    try:
        return getattr(dev, op)(*args, **kwargs)
    except KvfuseError:
        raise
    except Exception as exc:
        raise DeviceError(f"device {dev.name!r} failed in {op}: {type(exc).__name__}: {exc}") from exc


def run(op: str, req: Requirement, tensor_device: torch.device, device: str | None, *args: Any, **kwargs: Any) -> Any:
    """Pick the device for ``req`` and call its ``op``. The device's ``capabilities()``
    gate every call: what it does not declare is refused here with UnsupportedError naming
    the missing capability, so a device never receives (and never has to refuse) a call
    it did not declare."""
    return call(registry().select(req, tensor_device, device), op, *args, **kwargs)
