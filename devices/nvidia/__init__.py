"""The nvidia device plugin: Triton kernels and torch CUDA (or the Triton interpreter on
CPU tensors with ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

from kvfuse import Device, hookimpl
from kvfuse.devices.nvidia.device import NvidiaDevice

__all__ = ["NvidiaDevice", "kvfuse_devices"]


@hookimpl
def kvfuse_devices() -> list[Device]:
    return [NvidiaDevice()]
