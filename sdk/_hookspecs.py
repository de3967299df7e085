"""pluggy hook specifications. A device plugin is a module (or object) with
``@kvfuse.hookimpl``-decorated functions, published under the ``kvfuse.devices``
entry-point group; a transport plugin likewise under ``kvfuse.transports``::

    [project.entry-points."kvfuse.devices"]
    acme = "acme_kvfuse"

    [project.entry-points."kvfuse.transports"]
    mooncake = "kvfuse.transfer._mooncake"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvfuse._device import Device
    from kvfuse._transport import Transport

PROJECT = "kvfuse"
ENTRY_POINT_GROUP = "kvfuse.devices"
TRANSPORT_GROUP = "kvfuse.transports"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvfuse_devices() -> Sequence[Device]:  # type: ignore[empty-body]
    """Return the devices this plugin provides (instances of :class:`kvfuse.Device`).

    Called once per process, lazily. Must be cheap: probing happens later, through
    :meth:`Device.probe`.
    """


@hookspec
def kvfuse_transports() -> Sequence[type[Transport]]:  # type: ignore[empty-body]
    """Return the page transports (classes of :class:`kvfuse.Transport`) this plugin provides."""
