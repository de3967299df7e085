"""The npu device plugin: every op as an ONNX graph on ONNX Runtime execution providers
(CANN for Ascend where installed; the CPU provider stands in here)."""

from __future__ import annotations

from kvfuse import Device, hookimpl
from kvfuse.devices.npu.device import NpuDevice

__all__ = ["NpuDevice", "kvfuse_devices"]


@hookimpl
def kvfuse_devices() -> list[Device]:
    return [NpuDevice()]
