"""The reference device plugin: every op through kvfuse's float64 references, pure torch."""

from __future__ import annotations

from kvfuse import Device, hookimpl
from kvfuse.devices.reference.device import ReferenceDevice

__all__ = ["ReferenceDevice", "kvfuse_devices"]


@hookimpl
def kvfuse_devices() -> list[Device]:
    return [ReferenceDevice()]
