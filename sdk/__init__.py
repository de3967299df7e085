"""kvfuse — 以存换算: trade storage for compute.

Stored KV ("memory") is fused with live tokens inside attention, on any vendor's chip.
The ops live in :mod:`kvfuse.ops` and are re-exported here; devices are pluggy plugins
found through the ``kvfuse.devices`` entry-point group.
"""

from __future__ import annotations

from kvfuse._device import (
    API_VERSION,
    Availability,
    Capabilities,
    Device,
    OpCapability,
    Requirement,
)
from kvfuse._errors import (
    ContractError,
    DeviceError,
    DeviceMismatchError,
    DeviceNotFoundError,
    DeviceUnavailableError,
    DTypeError,
    IndexRangeError,
    InvalidValueError,
    KvfuseError,
    PluginError,
    ShapeError,
    StoreError,
    TransferError,
    TransferTimeoutError,
    UnsupportedError,
)
from kvfuse._hookspecs import hookimpl, hookspec
from kvfuse._registry import BrokenPlugin, Registry, registry
from kvfuse._transport import PoolDescriptor, Transport
from kvfuse._version import __version__
from kvfuse.ops import (
    AppendPlan,
    AttentionPlan,
    RopeConfig,
    Segment,
    SegmentTable,
    TransferHandle,
    append_kv,
    blend_select,
    copy_pages,
    fusion_attention,
    gather_pages,
    merge_states,
    plan_append,
    plan_attention,
    rope_rerotate,
    scatter_pages,
)

__all__ = [
    "API_VERSION",
    "AppendPlan",
    "AttentionPlan",
    "Availability",
    "BrokenPlugin",
    "Capabilities",
    "ContractError",
    "DTypeError",
    "Device",
    "DeviceError",
    "DeviceMismatchError",
    "DeviceNotFoundError",
    "DeviceUnavailableError",
    "IndexRangeError",
    "InvalidValueError",
    "KvfuseError",
    "OpCapability",
    "PluginError",
    "PoolDescriptor",
    "Registry",
    "Requirement",
    "RopeConfig",
    "Segment",
    "SegmentTable",
    "ShapeError",
    "StoreError",
    "TransferError",
    "TransferHandle",
    "TransferTimeoutError",
    "Transport",
    "UnsupportedError",
    "__version__",
    "append_kv",
    "blend_select",
    "copy_pages",
    "fusion_attention",
    "gather_pages",
    "hookimpl",
    "hookspec",
    "merge_states",
    "plan_append",
    "plan_attention",
    "registry",
    "rope_rerotate",
    "scatter_pages",
]
