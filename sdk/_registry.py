"""Device registry: loads plugins from entry points, isolates broken ones, picks devices.

Each plugin is loaded and called on its own: a plugin that fails to import, raises in a
hook, declares an incompatible ``api_version``, or returns something that is not a
:class:`Device` is recorded in :attr:`Registry.broken` and every other device keeps
working. ``KVFUSE_STRICT_PLUGINS=1`` turns such failures into :class:`PluginError`.

Environment:
    KVFUSE_PLUGINS         comma-separated allow-list of entry-point names to load.
    KVFUSE_STRICT_PLUGINS  ``1`` raises on the first broken plugin.
    KVFUSE_DEVICE          device used when an op is called with ``device=None``.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pluggy
import torch
from kvfuse import _hookspecs
from kvfuse._device import API_VERSION, Availability, Capabilities, Device, Requirement
from kvfuse._errors import (
    DeviceMismatchError,
    DeviceNotFoundError,
    DeviceUnavailableError,
    PluginError,
    UnsupportedError,
)
from kvfuse._transport import Transport

__all__ = ["BrokenPlugin", "Registry", "registry"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be used, and why."""

    name: str
    reason: str


def _api_compatible(version: str) -> bool:
    return str(version).split(".")[0] == API_VERSION.split(".")[0]


def _signature_problem(dev: Device, op: str) -> str | None:
    """Whether the device's ``op`` method takes kvfuse's call: the contract's positional
    parameters positionally and its keyword-only ones by name (``kvfuse.Device`` holds the
    contract's signatures). None if it does; else what differs."""
    import inspect

    try:
        got = inspect.signature(getattr(type(dev), op))
        want = inspect.signature(getattr(Device, op))
    except (TypeError, ValueError) as exc:
        return f"device {dev.name!r}: cannot read the signature of {op}: {exc}"
    params = list(want.parameters.values())[1:]
    pos = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    kw = {  # optional keywords added to the contract later (gather_pages' out) are not required
        p.name: p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    }
    try:
        got.bind(dev, *pos, **kw)
    except TypeError as exc:
        return f"device {dev.name!r}: {op}{got} does not take the contract's call {op}{want}: {exc}"
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """The devices of this process. Use :func:`registry` for the shared instance."""

    def __init__(self, *, strict: bool | None = None) -> None:
        self.strict = _env_flag("KVFUSE_STRICT_PLUGINS") if strict is None else strict
        self._pm = pluggy.PluginManager(_hookspecs.PROJECT)
        self._pm.add_hookspecs(_hookspecs)
        self._devices: dict[str, Device] = {}
        self._origin: dict[str, str] = {}
        self._probes: dict[str, Availability] = {}
        self._caps: dict[str, Capabilities | None] = {}  # asked once per device: every op call selects
        self.broken: list[BrokenPlugin] = []

    # -- loading ------------------------------------------------------------------------

    def load_entry_points(self, allow: Iterable[str] | None = None) -> None:
        """Load every plugin of the ``kvfuse.devices`` and ``kvfuse.transports`` groups (or
        the allow-listed ones)."""
        if allow is None:
            env = os.environ.get("KVFUSE_PLUGINS", "").strip()
            allow = [n.strip() for n in env.split(",") if n.strip()] if env else None
        allowed = set(allow) if allow is not None else None
        eps = [
            ep
            for group in (_hookspecs.ENTRY_POINT_GROUP, _hookspecs.TRANSPORT_GROUP)
            for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name)
        ]
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            if self._pm.has_plugin(ep.name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # sys.exit() while importing is a broken plugin too
                self._record(ep.name, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}", exc)
                continue
            self.register(plugin, name=ep.name)

    def register(self, plugin: object, name: str) -> list[Device]:
        """Register one plugin explicitly (a module or object with hookimpls).

        Returns the devices it added; on failure records it as broken (or raises in
        strict mode) and returns ``[]``.
        """
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            self._record(name, f"registration failed: {type(exc).__name__}: {exc}", exc)
            return []
        caller = self._pm.subset_hook_caller(
            "kvfuse_devices",
            remove_plugins=[p for p in self._pm.get_plugins() if p is not plugin],
        )
        try:
            results = caller()
        except (Exception, SystemExit) as exc:
            self._pm.unregister(plugin)
            self._record(name, f"hook kvfuse_devices raised {type(exc).__name__}: {exc}", exc)
            return []
        found: list[Device] = []
        for result in results:
            if not isinstance(result, (list, tuple)):
                result = [result]
            found.extend(result)
        caps: dict[str, Capabilities] = {}
        problem = self._check_devices(found, caps)
        if problem:
            self._pm.unregister(plugin)
            self._record(name, problem, None)
            return []
        for dev in found:
            self._devices[dev.name] = dev
            self._caps[dev.name] = caps[dev.name]  # as checked: kept, not asked again per call
            self._origin[dev.name] = name
        return found

    def _check_devices(self, found: Sequence[object], caps_out: dict[str, Capabilities] | None = None) -> str | None:
        """The first problem with the devices a plugin returned, or None; each device's
        capabilities (asked here once) into ``caps_out``."""
        for dev in found:
            if not isinstance(dev, Device):
                return f"kvfuse_devices returned {type(dev).__name__!s}, expected kvfuse.Device instances"
            version = getattr(dev, "api_version", None)
            if not isinstance(version, str):
                return f'device {getattr(dev, "name", "?")!r} declares no api_version (e.g. api_version = "1.0")'
            if not _api_compatible(dev.api_version):
                return (
                    f"device {dev.name!r} declares api_version {dev.api_version!r}, "
                    f"incompatible with kvfuse api {API_VERSION!r}"
                )
            if dev.name in self._devices:
                return f"device name {dev.name!r} is already registered by plugin {self._origin[dev.name]!r}"
            try:
                caps = dev.capabilities()
            except (Exception, SystemExit) as exc:
                return f"device {dev.name!r} capabilities() raised {type(exc).__name__}: {exc}"
            if caps_out is not None:
                caps_out[dev.name] = caps
            for op in caps.ops:
                if getattr(type(dev), op) is getattr(Device, op):
                    return f"device {dev.name!r} declares {op} but does not implement it"
                problem = _signature_problem(dev, op)
                if problem:
                    return problem
        return None

    def _record(self, name: str, reason: str, exc: BaseException | None) -> None:
        if self.strict:
            raise PluginError(f"plugin {name!r} is broken: {reason}") from exc
        self.broken.append(BrokenPlugin(name, reason))

    # -- lookup -------------------------------------------------------------------------

    def devices(self) -> list[Device]:
        """Every registered device, by name."""
        return [self._devices[n] for n in sorted(self._devices)]

    def transports(self) -> dict[str, type[Transport]]:
        """Page transports provided by the loaded plugins, by name."""
        found: dict[str, type[Transport]] = {}
        for result in self._pm.hook.kvfuse_transports():
            for cls in result:
                found[cls.name] = cls
        return found

    def transport(self, name: str) -> type[Transport]:
        try:
            return self.transports()[name]
        except KeyError:
            raise DeviceNotFoundError(
                f"no transport named {name!r} (registered: {sorted(self.transports())})"
            ) from None

    def origin(self, name: str) -> str:
        """The plugin (entry-point name) that provided device ``name``."""
        return self._origin[name]

    def probe(self, name: str) -> Availability:
        """The device's availability, probed once and cached."""
        if name not in self._probes:
            dev = self.get(name, require_available=False)
            try:
                self._probes[name] = dev.probe()
            except Exception as exc:
                self._probes[name] = Availability(available=False, reason=f"probe raised {type(exc).__name__}: {exc}")
        return self._probes[name]

    def get(self, name: str, *, require_available: bool = True) -> Device:
        """The device called ``name``; raises if unknown (or unavailable)."""
        dev = self._devices.get(name)
        if dev is None:
            known = ", ".join(sorted(self._devices)) or "none"
            broken = {b.name: b.reason for b in self.broken}
            hint = f"; plugin {name!r} is broken: {broken[name]}" if name in broken else ""
            raise DeviceNotFoundError(f"no device named {name!r} (registered: {known}){hint}")
        if require_available:
            avail = self.probe(name)
            if not avail.available:
                raise DeviceUnavailableError(f"device {name!r} is unavailable: {avail.reason}")
        return dev

    def select(self, requirement: Requirement, tensor_device: torch.device, name: str | None) -> Device:
        """The device to run a call on.

        ``name`` (or ``KVFUSE_DEVICE``) picks it explicitly. Otherwise: among available
        devices that accept ``tensor_device``, the highest-priority one whose capabilities
        cover ``requirement``; if none covers it, the highest-priority one, which then
        raises :class:`UnsupportedError` naming what is missing.
        """
        name = name or os.environ.get("KVFUSE_DEVICE") or None
        if name is not None:
            dev = self.get(name)
            accepts = self._guarded(dev, "accepts", lambda: dev.accepts(tensor_device))
            if accepts is None:
                raise DeviceUnavailableError(f"device {name!r} is unavailable: {self._probes[name].reason}")
            if not requirement.torch_device_types and not accepts:
                raise DeviceMismatchError(
                    "tensors", f"tensors on a torch device that device {name!r} accepts", str(tensor_device)
                )
        else:
            candidates = [
                d
                for d in sorted(self._devices.values(), key=lambda d: (-d.priority, d.name))
                if self.probe(d.name).available and self._accepts(d, tensor_device)
            ]
            if not candidates:
                raise DeviceNotFoundError(f"no available device accepts tensors on {tensor_device}")
            covering = [d for d in candidates if self._missing(d, requirement) is None]
            dev = (covering or candidates)[0]
        missing = self._missing(dev, requirement)
        if missing is None and not self.probe(dev.name).available:
            raise DeviceUnavailableError(f"device {dev.name!r} is unavailable: {self.probe(dev.name).reason}")
        if missing is not None:
            raise UnsupportedError(dev.name, requirement.op, missing)
        return dev

    def _accepts(self, dev: Device, tensor_device: torch.device) -> bool:
        return bool(self._guarded(dev, "accepts", lambda: dev.accepts(tensor_device)))

    def capabilities(self, name: str, *, fresh: bool = False) -> Capabilities | None:
        """The device's capabilities, or None if its ``capabilities()`` raised (the device is
        then reported unavailable, with the exception as the reason). Asked when the device
        registers and kept, like its probe: every op call selects a device, and building
        the capability models per call doubled a small op's overhead (93 against 45 us for
        a one-page scatter_pages here). ``fresh``: ask the device again (``kvfuse
        devices`` does, so a device that went bad since shows as unavailable)."""
        if fresh or name not in self._caps:
            dev = self.get(name, require_available=False)
            self._caps[name] = self._guarded(dev, "capabilities", dev.capabilities)
        return self._caps[name]

    def _missing(self, dev: Device, requirement: Requirement) -> str | None:
        caps = self.capabilities(dev.name)
        return caps.missing(requirement) if caps is not None else f"{requirement.op} (capabilities() raised)"

    def _guarded(self, dev: Device, what: str, fn: Callable[[], _T]) -> _T | None:
        """``fn()``; if the device's own method raises, the device is marked unavailable
        (the reason names the exception) and None is returned."""
        try:
            return fn()
        except Exception as exc:
            self._probes[dev.name] = Availability(
                available=False, reason=f"{what}() raised {type(exc).__name__}: {exc}"
            )
            return None


_lock = threading.Lock()
_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    with _lock:
        if _registry is None:
            reg = Registry()
            reg.load_entry_points()
            _registry = reg
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry so the next :func:`registry` call reloads it."""
    global _registry
    with _lock:
        _registry = None
