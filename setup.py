"""The one thing pyproject.toml cannot say for every setuptools: the cpu device's C
extension (``devices/cpu/rows.c``, copy_pages in one pass). ``optional``: without a C
compiler or Python's headers the install goes on, and the device copies through a stage."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvfuse.devices.cpu._rows", ["devices/cpu/rows.c"], libraries=["dl"], optional=True)])
