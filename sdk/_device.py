"""The device model: what a kvfuse device is, what it declares, and what it implements.

A device is one backend (a chip family and its runtime). Vendors subclass :class:`Device`,
declare what they support in :meth:`Device.capabilities`, and override the op methods they
declare. ``kvfuse.ops`` validates every call against CONTRACTS.md and against the
capabilities before dispatch, so an op method only ever receives validated arguments.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from kvfuse._errors import UnsupportedError
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

if TYPE_CHECKING:
    from kvfuse.ops import RopeConfig, SegmentTable, TransferHandle

__all__ = [
    "API_VERSION",
    "DTYPE_NAMES",
    "OP_FEATURES",
    "OP_NAMES",
    "Availability",
    "Capabilities",
    "Device",
    "OpCapability",
    "Requirement",
    "dtype_name",
]

API_VERSION = "1.0"
"""Version of the device API and of CONTRACTS.md. Same major = compatible."""

DType = Literal["fp32", "fp16", "bf16"]
DTYPE_NAMES: dict[torch.dtype, DType] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}
ALL_DTYPES: frozenset[DType] = frozenset(DTYPE_NAMES.values())

OP_NAMES: tuple[str, ...] = (
    "fusion_attention",
    "merge_states",
    "rope_rerotate",
    "blend_select",
    "append_kv",
    "gather_pages",
    "scatter_pages",
    "copy_pages",
)

OP_FEATURES: dict[str, frozenset[str]] = {
    "fusion_attention": frozenset({"gqa", "causal", "non_causal", "window", "softcap", "rope_neox", "rope_gptj"}),
    "rope_rerotate": frozenset({"rope_neox", "rope_gptj"}),
    "copy_pages": frozenset({"non_blocking"}),
}
"""Optional features per op. A call needing a feature the device lacks is unsupported."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"fp32"``; other dtypes → their torch name."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


class Requirement(BaseModel):
    """What one call needs from a device; built by ``kvfuse.ops`` validation."""

    model_config = ConfigDict(frozen=True)

    op: str
    dtype: str | None = None
    head_dim: int | None = None
    page_size: int | None = None
    features: frozenset[str] = frozenset()
    torch_device_types: frozenset[str] = frozenset()


class OpCapability(BaseModel):
    """What a device supports of one op. ``None`` for head_dims/page_sizes means any."""

    model_config = ConfigDict(frozen=True)

    dtypes: frozenset[DType] = ALL_DTYPES
    head_dims: frozenset[int] | None = None
    page_sizes: frozenset[int] | None = None
    features: frozenset[str] = frozenset()

    @field_serializer("dtypes", "head_dims", "page_sizes", "features")
    def _sorted(self, value: frozenset[Any] | None) -> list[Any] | None:
        return None if value is None else sorted(value)


class Capabilities(BaseModel):
    """Per op, what a device supports. An op absent from ``ops`` is unsupported.

    ``reach`` lists the torch device types whose tensors the device's ops accept
    (``copy_pages`` may move pages between any two of them).
    """

    model_config = ConfigDict(frozen=True)

    ops: dict[str, OpCapability] = Field(default_factory=dict)
    reach: frozenset[str] = frozenset({"cpu"})

    @field_serializer("reach")
    def _sorted(self, value: frozenset[str]) -> list[str]:
        return sorted(value)

    @model_validator(mode="after")
    def _known_names(self) -> Capabilities:
        for op, cap in self.ops.items():
            if op not in OP_NAMES:
                raise ValueError(f"unknown op {op!r}; known ops: {', '.join(OP_NAMES)}")
            unknown = cap.features - OP_FEATURES.get(op, frozenset())
            if unknown:
                raise ValueError(f"unknown features for {op}: {sorted(unknown)}")
        return self

    @classmethod
    def full(
        cls,
        ops: Iterable[str] = OP_NAMES,
        *,
        reach: Iterable[str] = ("cpu",),
        exclude_features: Iterable[str] = (),
    ) -> Capabilities:
        """Every dtype, head dim, page size and feature of ``ops``, less ``exclude_features``."""
        excluded = frozenset(exclude_features)
        return cls(
            ops={op: OpCapability(features=OP_FEATURES.get(op, frozenset()) - excluded) for op in ops},
            reach=frozenset(reach),
        )

    def missing(self, req: Requirement) -> str | None:
        """The first capability ``req`` needs that is not declared, or None if all are."""
        cap = self.ops.get(req.op)
        if cap is None:
            return req.op
        if req.dtype is not None and req.dtype not in cap.dtypes:
            return f"{req.op}.dtype={req.dtype}"
        if req.head_dim is not None and cap.head_dims is not None and req.head_dim not in cap.head_dims:
            return f"{req.op}.head_dim={req.head_dim}"
        if req.page_size is not None and cap.page_sizes is not None and req.page_size not in cap.page_sizes:
            return f"{req.op}.page_size={req.page_size}"
        for feature in sorted(req.features - cap.features):
            return f"{req.op}.{feature}"
        for kind in sorted(req.torch_device_types - self.reach):
            return f"{req.op}.reach={kind}"
        return None


class Availability(BaseModel):
    """A probe's answer: can this device run here, and if not, why."""

    model_config = ConfigDict(frozen=True)

    available: bool
    reason: str = ""
    mode: str = ""


class Device(abc.ABC):
    """One kvfuse backend. Subclass it, set the class attributes, declare capabilities,
    and override the op methods you declare.

    Op methods receive arguments already validated by ``kvfuse.ops`` (shapes, dtypes,
    index ranges, capabilities). Tensor shapes follow the glossary in ``kvfuse.ops``.
    Vendor exceptions must be translated into kvfuse errors (``raise DeviceError(...)
    from exc``); ``kvfuse.ops`` wraps any that escape.
    """

    name: ClassVar[str]
    vendor: ClassVar[str]
    api_version: ClassVar[str]
    """The kvfuse device API this device was written against, e.g. ``"1.0"``: required,
    written out (not ``kvfuse.API_VERSION``, which would always match). A major version
    other than kvfuse's makes the plugin broken."""
    torch_device_type: ClassVar[str] = "cpu"
    priority: ClassVar[int] = 0
    """Higher wins when kvfuse picks a device automatically; the reference device is 0."""

    @abc.abstractmethod
    def probe(self) -> Availability:
        """Whether this device can run here, cheaply (must not initialise a GPU context)."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this device supports."""

    def accepts(self, device: torch.device) -> bool:
        """Whether op tensors may live on ``device``."""
        return device.type == self.torch_device_type

    def _unsupported(self, op: str) -> UnsupportedError:
        return UnsupportedError(self.name, op, op)

    # -- ops: override those you declare ------------------------------------------------

    def fusion_attention(
        self,
        q: torch.Tensor,
        q_indptr: torch.Tensor,
        q_pos: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        segments: SegmentTable,
        *,
        causal: bool,
        sm_scale: float,
        softcap: float,
        window_left: int,
        rope: RopeConfig | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`kvfuse.ops.fusion_attention`; ``sm_scale`` is already resolved."""
        raise self._unsupported("fusion_attention")

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`kvfuse.ops.merge_states`."""
        raise self._unsupported("merge_states")

    def rope_rerotate(
        self, k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig
    ) -> torch.Tensor:
        """See :func:`kvfuse.ops.rope_rerotate`."""
        raise self._unsupported("rope_rerotate")

    def blend_select(
        self,
        k_stored: torch.Tensor,
        k_fresh: torch.Tensor,
        count: int,
        always: torch.Tensor | None,
    ) -> torch.Tensor:
        """See :func:`kvfuse.ops.blend_select`; ``count`` is ``blend_count(num_tokens, ratio)``."""
        raise self._unsupported("blend_select")

    def append_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """See :func:`kvfuse.ops.append_kv`."""
        raise self._unsupported("append_kv")

    def gather_pages(
        self,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
        *,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :func:`kvfuse.ops.gather_pages`. ``out`` (validated by kvfuse) is optional for
        a device: one whose method does not take it gets its result copied into ``out``."""
        raise self._unsupported("gather_pages")

    def scatter_pages(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
    ) -> None:
        """See :func:`kvfuse.ops.scatter_pages`."""
        raise self._unsupported("scatter_pages")

    def copy_pages(
        self,
        src_k: torch.Tensor,
        src_v: torch.Tensor,
        src_ids: torch.Tensor,
        dst_k: torch.Tensor,
        dst_v: torch.Tensor,
        dst_ids: torch.Tensor,
        *,
        non_blocking: bool,
    ) -> TransferHandle:
        """See :func:`kvfuse.ops.copy_pages`."""
        raise self._unsupported("copy_pages")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vendor={self.vendor!r}>"
