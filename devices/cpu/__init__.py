"""The cpu device plugin: fusion attention as OpenVINO models, moves in vectorised torch
(copy_pages in C where the ``_rows`` extension was built)."""

from __future__ import annotations

from kvfuse import Device, hookimpl
from kvfuse.devices.cpu.device import CpuDevice

__all__ = ["CpuDevice", "kvfuse_devices"]


@hookimpl
def kvfuse_devices() -> list[Device]:
    return [CpuDevice()]
