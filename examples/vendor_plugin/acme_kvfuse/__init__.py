"""The plugin: kvfuse finds this module through the ``kvfuse.devices`` entry point."""

from __future__ import annotations

import kvfuse

from acme_kvfuse.device import AcmeDevice

__all__ = ["AcmeDevice", "kvfuse_devices"]


@kvfuse.hookimpl
def kvfuse_devices() -> list[kvfuse.Device]:
    return [AcmeDevice()]
