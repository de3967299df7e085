from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("kvfuse")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
