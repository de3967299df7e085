"""Dispatch of a validated call to a device, with vendor exceptions translated."""

from __future__ import annotations

import functools
import inspect
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


@functools.lru_cache(maxsize=128)
def _keywords(cls: type, op: str) -> frozenset[str]:
    params = inspect.signature(getattr(cls, op)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset({"**"})
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY)


def takes_keyword(dev: Device, op: str, name: str) -> bool:
    """Whether the device's ``op`` takes the optional keyword ``name`` (an addition to the
    contract that devices written before it do not have: the ops layer then does the
    work around the device, e.g. copies its result into ``out``)."""
    names = _keywords(type(dev), op)
    return name in names or "**" in names
