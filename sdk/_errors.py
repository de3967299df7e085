"""The kvfuse error tree. Every error kvfuse raises is one of these::

    KvfuseError
    ├── ContractError (ValueError)          a call broke CONTRACTS.md; nothing was written
    │   ├── ShapeError                      wrong rank or size
    │   ├── DTypeError (TypeError)          wrong or mixed dtype
    │   ├── DeviceMismatchError             tensor on a torch device the call cannot use
    │   ├── IndexRangeError (IndexError)    index out of range, duplicate, or negative
    │   └── InvalidValueError               a value the contract forbids (NaN lse, bad ratio)
    ├── UnsupportedError                    the device does not declare this capability
    ├── DeviceError                         a vendor runtime failed (raised ... from exc)
    │   └── DeviceUnavailableError          the device's probe said no
    ├── DeviceNotFoundError (LookupError)   no device of that name is registered
    ├── PluginError                         a plugin failed to load (strict mode)
    ├── StoreError                          the KV store cannot do what was asked (full, bad chunk)
    └── TransferError                       a page copy failed; names the failed pages
        └── TransferTimeoutError (TimeoutError)

Contract errors name the argument, what was expected and what was received, and are
raised before the first write, so every buffer is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ContractError",
    "DTypeError",
    "DeviceError",
    "DeviceMismatchError",
    "DeviceNotFoundError",
    "DeviceUnavailableError",
    "IndexRangeError",
    "InvalidValueError",
    "KvfuseError",
    "PluginError",
    "ShapeError",
    "StoreError",
    "TransferError",
    "TransferTimeoutError",
    "UnsupportedError",
]


class KvfuseError(Exception):
    """Base class of every error kvfuse raises."""


class ContractError(KvfuseError, ValueError):
    """An argument broke the op contract. Raised before any write.

    Attributes:
        argument: the argument's name, e.g. ``"segments.page_indices"``.
        expected: what the contract asks for.
        received: what the call passed.
    """

    def __init__(self, argument: str, expected: str, received: object) -> None:
        self.argument = argument
        self.expected = expected
        self.received = received
        super().__init__(f"argument '{argument}': expected {expected}, received {received}")


class ShapeError(ContractError):
    """Wrong rank or size."""


class DTypeError(ContractError, TypeError):
    """Wrong dtype, or dtypes that must match do not."""


class DeviceMismatchError(ContractError):
    """A tensor lives on a torch device the chosen kvfuse device cannot use."""


class IndexRangeError(ContractError, IndexError):
    """An index is out of range, negative, or repeated where it must be unique."""


class InvalidValueError(ContractError):
    """A value the contract forbids (NaN or +inf lse, ratio outside [0, 1], ...)."""


class UnsupportedError(KvfuseError):
    """The device does not declare the capability this call needs.

    Attributes:
        device: the device's name.
        op: the op's name.
        missing: the missing capability, e.g. ``"fusion_attention.softcap"``.
    """

    def __init__(self, device: str, op: str, missing: str) -> None:
        self.device = device
        self.op = op
        self.missing = missing
        super().__init__(f"device '{device}' does not support {op}: missing capability {missing}")


class DeviceError(KvfuseError):
    """A vendor runtime failed; the vendor's exception is the ``__cause__``."""


class DeviceUnavailableError(DeviceError):
    """The device is registered but its probe reports it unavailable."""


class DeviceNotFoundError(KvfuseError, LookupError):
    """No registered device has this name."""


class PluginError(KvfuseError):
    """A plugin failed to load or misbehaved (raised in strict mode)."""


class StoreError(KvfuseError):
    """The KV store cannot do what was asked (pool full of pinned chunks, malformed chunk)."""


class TransferError(KvfuseError):
    """A page copy failed.

    Attributes:
        failed_pages: destination page ids whose contents are not valid.
    """

    def __init__(self, message: str, failed_pages: Sequence[int] = ()) -> None:
        self.failed_pages = list(failed_pages)
        suffix = f" (failed destination pages: {self.failed_pages})" if self.failed_pages else ""
        super().__init__(message + suffix)


class TransferTimeoutError(TransferError, TimeoutError):
    """``TransferHandle.wait(timeout)`` ran out of time before the copy finished."""
