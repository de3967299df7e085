"""The disk tier: one file per chunk, an explicit header and raw bytes, both checksummed.

File layout (little-endian)::

    b"KVFUSE\\x00\\x01" | u64 header length | header (JSON) | 32-byte blake2b of header |
    payload (K bytes, then V bytes)

The header holds the key, the namespace fingerprint, dtype, shape and the payload's
blake2b. Files are written to a temporary name, fsync'ed and renamed, so only complete
entries are ever visible. Nothing is unpickled. A file that fails any check is a miss and
is moved to ``quarantine/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kvfuse.store._keys import DTYPES, Namespace

MAGIC = b"KVFUSE\x00\x01"
SUFFIX = ".kv"


@dataclass(frozen=True)
class DiskEntry:
    key: str
    path: Path
    nbytes: int
    num_tokens: int
    mtime: float


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(torch.uint8).numpy().tobytes())


def encode(key: str, namespace: Namespace, k: torch.Tensor, v: torch.Tensor) -> bytes:
    """One chunk in kvfuse's format (the disk file's bytes, also the remote tier's value)."""
    payload_k, payload_v = _raw(k.cpu()), _raw(v.cpu())
    h = hashlib.blake2b(digest_size=32)
    h.update(payload_k)
    h.update(payload_v)
    header = json.dumps(
        {
            "key": key,
            "namespace": namespace.fingerprint(),
            "dtype": namespace.dtype,
            "shape": list(k.shape),
            "payload_bytes": len(payload_k) + len(payload_v),
            "payload_blake2b": h.hexdigest(),
        },
        sort_keys=True,
    ).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + _digest(header) + payload_k + payload_v


def decode(data: bytes | memoryview, key: str, namespace: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, V) of an encoded chunk; raises ValueError on any checksum or layout mismatch."""
    import io

    f = io.BytesIO(data)
    meta = read_header(f, key, namespace)
    raw_shape = meta["shape"]
    if not isinstance(raw_shape, list):
        raise ValueError("bad shape")
    shape = [int(x) for x in raw_shape]
    dtype = DTYPES[str(meta["dtype"])]
    if tuple(shape) != namespace.chunk_shape(shape[1]) or dtype != namespace.torch_dtype:
        raise ValueError("layout mismatch")
    payload = f.read()
    if len(payload) != meta["payload_bytes"]:
        raise ValueError("truncated payload")
    if hashlib.blake2b(payload, digest_size=32).hexdigest() != meta["payload_blake2b"]:
        raise ValueError("payload checksum mismatch")
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    half = len(payload) // 2
    return buf[:half].view(dtype).reshape(shape), buf[half:].view(dtype).reshape(shape)


def read_header(f: Any, key: str, namespace: Namespace) -> dict[str, object]:
    """The verified header at the start of ``f``; raises ValueError on any mismatch."""
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("bad magic")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > 1 << 20:
        raise ValueError("header too long")
    header = f.read(length)
    if len(header) != length or f.read(32) != _digest(header):
        raise ValueError("header checksum mismatch")
    meta: dict[str, object] = json.loads(header)
    if meta.get("namespace") != namespace.fingerprint():
        raise ValueError("namespace mismatch")
    if meta.get("key") != key:
        raise ValueError("key mismatch")
    return meta


class DiskTier:
    def __init__(self, root: str | os.PathLike[str], namespace: Namespace) -> None:
        self.root = Path(root)
        self.namespace = namespace
        self.quarantine = self.root / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine.mkdir(exist_ok=True)
        self.quarantined = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def write(self, key: str, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write a chunk atomically (``encode``'s bytes); returns the file size."""
        data = encode(key, self.namespace, k, v)
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(key))
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return len(data)

    def read(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's (K, V) on the host, or None (a miss) if absent or invalid."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode(data, key, self.namespace)
        except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError):
            self._quarantine(path)
            return None

    def _quarantine(self, path: Path) -> None:
        try:
            os.replace(path, self.quarantine / f"{path.name}.{uuid.uuid4().hex[:8]}")
            self.quarantined += 1
        except FileNotFoundError:
            pass  # another process got there first

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass

    def scan(self) -> list[DiskEntry]:
        """Every valid entry on disk, oldest first (headers only; bad files quarantined)."""
        entries = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                with open(path, "rb") as f:
                    meta = read_header(f, path.name.removesuffix(SUFFIX), self.namespace)
                stat = path.stat()
            except FileNotFoundError:
                continue
            except (ValueError, struct.error, json.JSONDecodeError):
                self._quarantine(path)
                continue
            shape = meta["shape"]
            assert isinstance(shape, list)
            entries.append(DiskEntry(str(meta["key"]), path, stat.st_size, int(shape[1]), stat.st_mtime))
        return sorted(entries, key=lambda e: e.mtime)
