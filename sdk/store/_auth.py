"""The key of the store's authenticated mode, and the MAC it keys.

With a key, every chunk's header is authenticated with a keyed blake2b (the header names
each layer's SHA-256, so the MAC covers the payload too). Without one, the header's
digest is unkeyed: it catches corruption, not forgery.
"""

from __future__ import annotations

import hashlib
import os

from kvfuse._errors import StoreError

MIN_KEY_BYTES = 16


def load_mac_key(*, env: str | None = None, file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The key from environment variable ``env`` (hex) or ``file`` (raw bytes), or None if
    neither is named. A named source that is missing, unreadable or too short is an error:
    a store that was meant to authenticate never silently runs without."""
    if env is not None and file is not None:
        raise StoreError("name the MAC key's environment variable or its file, not both")
    if env is not None:
        text = os.environ.get(env)
        if text is None:
            raise StoreError(f"MAC key: environment variable {env} is not set")
        try:
            key = bytes.fromhex(text.strip())
        except ValueError as exc:
            raise StoreError(f"MAC key: {env} must hold the key as hex") from exc
    elif file is not None:
        try:
            with open(file, "rb") as f:
                key = f.read(4096)
        except OSError as exc:
            raise StoreError(f"MAC key: cannot read {file}: {exc}") from exc
    else:
        return None
    if not MIN_KEY_BYTES <= len(key) <= 64:
        raise StoreError(f"MAC key: expected {MIN_KEY_BYTES} to 64 bytes, got {len(key)}")
    return key


def header_digest(header: bytes, mac_key: bytes | None) -> bytes:
    """32 bytes: the keyed blake2b of ``header`` with a key, its plain blake2b without."""
    if mac_key is None:
        return hashlib.blake2b(header, digest_size=32).digest()
    return hashlib.blake2b(header, digest_size=32, key=mac_key, person=b"kvfuse-chunk").digest()
