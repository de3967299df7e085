"""Built-in kvfuse devices. Each registers through the ``kvfuse.devices`` entry-point group,
exactly like a third-party plugin.

Every device folder has the same files, so a vendor copies one folder to start:

- ``__init__.py`` — the plugin: a ``@kvfuse.hookimpl def kvfuse_devices()``.
- ``device.py``   — the :class:`kvfuse.Device` subclass: probe, capabilities, op methods.

Implementation modules (kernels, graphs) sit beside them.
"""
