"""kvfuse.testing: the kit for writing and proving a device plugin.

- :class:`DeviceSkeleton`: a typed starting point. Override the ops your chip runs; it
  declares exactly those (all dtypes and features) until you narrow ``capabilities()``.
- The float64 references of every op (``*_reference``), the RoPE rotation and table the
  contract defines (:func:`rope_rotate`, ``RopeConfig.table``), dtype names and the
  contract's tolerances.
- :func:`check_device`: the checks kvfuse runs when it loads a plugin (``api_version``,
  op signatures, declared ops implemented, ``capabilities()`` well formed), as a list of
  problems, so a plugin's own tests can assert there are none.
- :func:`run_conformance`: the conformance suite on a registered device, as a report.
- :func:`check_transport`: what every page transport must do (bit-exact pages, bad sends
  refused naming every page, no hang on a closed peer), on real transfers between two
  instances, as a list of problems.

Refusals are derived: kvfuse never calls a device op that its ``capabilities()`` does not
declare (the call raises :class:`kvfuse.UnsupportedError` naming the missing capability),
so a device needs no refusal code of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvfuse._device import API_VERSION, DTYPE_NAMES, OP_NAMES, Availability, Capabilities, Device, dtype_name
from kvfuse._transport_kit import check_transport
from kvfuse.ops._attention import fusion_attention_reference
from kvfuse.ops._blend import blend_select_reference
from kvfuse.ops._checks import TOLERANCES
from kvfuse.ops._merge import merge_states_reference
from kvfuse.ops._moves import (
    append_kv_reference,
    copy_pages_reference,
    gather_pages_reference,
    scatter_pages_reference,
)
from kvfuse.ops._rope import rope_rerotate_reference
from kvfuse.ops._rope import rotate as rope_rotate

if TYPE_CHECKING:
    from kvfuse.conformance._runner import Report

__all__ = [
    "API_VERSION",
    "DTYPE_NAMES",
    "TOLERANCES",
    "DeviceSkeleton",
    "append_kv_reference",
    "blend_select_reference",
    "check_device",
    "check_transport",
    "copy_pages_reference",
    "dtype_name",
    "fusion_attention_reference",
    "gather_pages_reference",
    "merge_states_reference",
    "rope_rerotate_reference",
    "rope_rotate",
    "run_conformance",
    "scatter_pages_reference",
]


class DeviceSkeleton(Device):
    """A device to start from: set ``name``, ``vendor`` and ``torch_device_type``,
    override the op methods your chip runs (their signatures and argument shapes are
    :class:`kvfuse.Device`'s), then narrow :meth:`capabilities` to what you really compute.

    ``api_version`` is the device API you write against; keep it written out (kvfuse
    refuses a plugin without one, or with another major version).
    """

    api_version = "1.0"
    name = "skeleton"
    vendor = "(your company)"

    def probe(self) -> Availability:
        """Available; replace with a cheap check for your runtime (no device context)."""
        return Availability(available=True, reason="DeviceSkeleton: replace probe()")

    def capabilities(self) -> Capabilities:
        """Every op this class overrides, with every dtype and feature, reaching
        ``torch_device_type``: narrow it to what you compute."""
        ops = [op for op in OP_NAMES if getattr(type(self), op) is not getattr(Device, op)]
        return Capabilities.full(ops, reach=(self.torch_device_type,))


def check_device(device: Device) -> list[str]:
    """What kvfuse would refuse when loading ``device`` from a plugin (empty: nothing)."""
    from kvfuse._registry import Registry

    problem = Registry(strict=False)._check_devices([device])
    return [problem] if problem else []


def run_conformance(device: str, profile: str = "smoke", **kw: Any) -> Report:
    """The conformance suite on registered device ``device``; ``kw`` as
    :func:`kvfuse.conformance._runner.run_suite` (``seed``, ``isolate``, ``timeout``, ...)."""
    from kvfuse.conformance import cases
    from kvfuse.conformance._runner import run_suite

    return run_suite([device], cases(profile), profile=profile, **kw)
