"""The disk tier: one file per chunk, an explicit header and raw bytes, both checksummed.

File layout (little-endian, format 2)::

    b"KVFUSE\\x00\\x02" | u64 header length | header (JSON) | 32-byte digest of header |
    payload: layer 0's K bytes, layer 0's V bytes, layer 1's K, layer 1's V, ...

The header holds the key, the namespace fingerprint, dtype, shape, the payload's size,
one checksum per layer (over its K then V bytes) and ``auth``. The digest is the header's
blake2b, keyed in the authenticated mode (``auth = "blake2b-keyed"``; see ``_auth``).

The layer checksums are what the threat model needs, and no more, because checking them
is the CPU cost of every disk read. Without a key a file is protected against
corruption, not forgery (anyone who can write it can write valid digests of any kind),
so each layer carries a CRC-32 (``layer_check = "crc32"``, 7 GB/s here). With a key the
MAC'd header must bind the payload, so each layer carries a SHA-256 (``"sha256"``,
collision-resistant; 2 GB/s on the CPU's SHA extensions, blake2b gives 1.4).
Nothing is unpickled. Layer-major payload and per-layer digests let a reader move a chunk
layer by layer, each layer verified before anyone may read it (:class:`ChunkReader`), so
attention on layer 0 can start while later layers are still coming from the disk.
With ``DiskTier.direct``, payload bytes the page cache does not hold are read with direct
I/O (``_direct``).

Reading trusts nothing: the file must be a regular file (opened without following links
and without blocking, so a FIFO or device never stalls a read), the header is at most
64 KiB, its digest must match, its fields must pass a strict schema and agree with each
other and with the namespace, and the file's size must be exactly what the header
declares before a payload byte is read. A file that fails any check is a miss and is
moved to ``quarantine/`` (format-1 files included). Files are written to a temporary
name, fsync'ed and renamed, so only complete entries are ever visible; temporary files of
writers that died are removed when a store opens the directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import io
import os
import re
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Literal

import torch
from kvfuse._errors import StoreError
from kvfuse.store._auth import header_digest
from kvfuse.store._direct import read_direct, reopen_direct, resident
from kvfuse.store._keys import DTYPES, Namespace
from kvfuse.store._pool import bytes_of
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAGIC = b"KVFUSE\x00\x02"
SUFFIX = ".kv"
MAX_HEADER = 64 << 10
ALIGN = 64  # the payload's offset in a file or value: any dtype can view it in place
_IOV_MAX = 512  # pieces per preadv (the OS allows 1024)
_CHECKERS = os.cpu_count() or 1
_CHECK_PART = 4 << 20  # the least payload worth a share of its own
_checkers = concurrent.futures.ThreadPoolExecutor(_CHECKERS, thread_name_prefix="kvfuse-check")
PREFIX = len(MAGIC) + 8  # magic and header length
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_TMP = re.compile(r"\.(?P<key>.+)\.(?P<pid>\d+)\.[0-9a-f]{32}\.tmp")


class ChunkRejected(ValueError):
    """An encoded chunk failed a check (why is the message); callers treat it as a miss."""


class ChunkHeader(BaseModel):
    """The header's schema: exact types, no missing or extra fields."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    key: str = Field(max_length=256)
    namespace: str = Field(pattern=r"^[0-9a-f]{32}$")
    dtype: Literal["fp32", "fp16", "bf16"]
    shape: tuple[int, int, int, int]
    payload_bytes: int = Field(ge=0)
    layer_check: Literal["crc32", "sha256"]
    layer_digests: tuple[Annotated[str, Field(pattern=r"^([0-9a-f]{8}|[0-9a-f]{64})$")], ...] = Field(max_length=4096)
    auth: Literal["none", "blake2b-keyed"] = "none"


@dataclass(frozen=True)
class DiskEntry:
    key: str
    path: Path
    nbytes: int
    num_tokens: int
    mtime: float


def check_key(key: str) -> str:
    """A key usable as a file name (letters, digits, '_' and '-'; at most 128)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise StoreError(f"chunk key must be 1-128 letters, digits, '_' or '-' (starting with neither), got {key!r}")
    return key


def _layer_bytes(k: torch.Tensor, v: torch.Tensor) -> list[memoryview]:
    """The payload's pieces in file order (K then V of each layer), without copies where
    the layers are contiguous."""
    parts = []
    for i in range(k.shape[0]):
        for t in (k[i], v[i]):
            parts.append(bytes_of(t.detach().cpu().contiguous()))
    return parts


def encode_parts(
    key: str, namespace: Namespace, k: torch.Tensor, v: torch.Tensor, mac_key: bytes | None = None
) -> list[bytes | memoryview]:
    """One chunk in kvfuse's format, as the pieces to write in order (header, then each
    layer's K and V).

    k, v: [num_layers, num_tokens, num_kv_heads, head_dim], the namespace's dtype
    """
    parts = _layer_bytes(k, v)
    check = "crc32" if mac_key is None else "sha256"
    digests = [_layer_digest(check, [parts[i]], [parts[i + 1]]) for i in range(0, len(parts), 2)]
    header = ChunkHeader(
        key=key,
        namespace=namespace.fingerprint(),
        dtype=namespace.dtype,  # type: ignore[arg-type]
        shape=tuple(int(x) for x in k.shape),  # type: ignore[arg-type]
        payload_bytes=sum(p.nbytes for p in parts),
        layer_check=check,  # type: ignore[arg-type]
        layer_digests=tuple(digests),
        auth="none" if mac_key is None else "blake2b-keyed",
    )
    text = header.model_dump_json().encode()
    text += b" " * (-(PREFIX + len(text) + 32) % ALIGN)  # JSON allows it: the payload starts aligned
    return [MAGIC + struct.pack("<Q", len(text)) + text + header_digest(text, mac_key), *parts]


def encode(key: str, namespace: Namespace, k: torch.Tensor, v: torch.Tensor, mac_key: bytes | None = None) -> bytes:
    """One chunk in kvfuse's format (the disk file's bytes, also the remote tier's value).

    k, v: [num_layers, num_tokens, num_kv_heads, head_dim], the namespace's dtype
    """
    return b"".join(encode_parts(key, namespace, k, v, mac_key))


def read_header(f: IO[bytes], size: int, key: str, namespace: Namespace, mac_key: bytes | None) -> ChunkHeader:
    """The verified header at the start of ``f`` (``size`` bytes in all); raises
    :class:`ChunkRejected` on any mismatch. Reads at most the header's bytes."""
    if size < PREFIX + 32 or f.read(len(MAGIC)) != MAGIC:
        raise ChunkRejected("bad magic")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(MAX_HEADER, size - PREFIX - 32):
        raise ChunkRejected(f"header length {length} impossible for a {size}-byte entry")
    text = f.read(length)
    if len(text) != length or f.read(32) != header_digest(text, mac_key):
        raise ChunkRejected("header digest mismatch" if mac_key is None else "header MAC invalid (or corrupt)")
    try:
        meta = ChunkHeader.model_validate_json(text)
    except ValidationError as exc:
        raise ChunkRejected(f"header fields invalid: {exc.error_count()} errors") from None
    if meta.auth != ("none" if mac_key is None else "blake2b-keyed"):
        raise ChunkRejected(f"entry auth {meta.auth!r} does not match the store's mode")
    if meta.namespace != namespace.fingerprint():
        raise ChunkRejected("namespace mismatch")
    if meta.key != key:
        raise ChunkRejected("key mismatch")
    num_tokens = meta.shape[1]
    if num_tokens < 0 or meta.shape != namespace.chunk_shape(num_tokens) or meta.dtype != namespace.dtype:
        raise ChunkRejected(f"layout {meta.shape} {meta.dtype} is not this namespace's")
    want = 2 * num_tokens * namespace.num_layers * namespace.num_kv_heads * namespace.head_dim
    if meta.payload_bytes != want * namespace.torch_dtype.itemsize:
        raise ChunkRejected(f"payload_bytes {meta.payload_bytes} does not match shape {meta.shape}")
    if meta.layer_check != ("crc32" if mac_key is None else "sha256"):
        raise ChunkRejected(f"layer check {meta.layer_check!r} does not match the store's mode")
    width = 8 if meta.layer_check == "crc32" else 64
    if len(meta.layer_digests) != namespace.num_layers or any(len(d) != width for d in meta.layer_digests):
        raise ChunkRejected(f"{len(meta.layer_digests)} layer digests for {namespace.num_layers} layers")
    if size != PREFIX + length + 32 + meta.payload_bytes:
        raise ChunkRejected(f"entry is {size} bytes, its header declares {PREFIX + length + 32 + meta.payload_bytes}")
    return meta


def _layer_digest(check: str, k: list[memoryview], v: list[memoryview]) -> str:
    """``check`` ("crc32" or "sha256") of a layer's bytes: its K pieces, then its V pieces."""
    if check == "crc32":
        crc = 0
        for piece in (*k, *v):
            crc = zlib.crc32(piece, crc)
        return f"{crc:08x}"
    h = hashlib.sha256()
    for piece in (*k, *v):
        h.update(piece)
    return h.hexdigest()


def _check_layer(meta: ChunkHeader, i: int, k: list[memoryview], v: list[memoryview]) -> None:
    """Raise :class:`ChunkRejected` unless layer ``i``'s bytes (K pieces, then V pieces)
    have the header's digest."""
    if _layer_digest(meta.layer_check, k, v) != meta.layer_digests[i]:
        raise ChunkRejected(f"payload checksum mismatch in layer {i}")


def decode(
    data: bytes | memoryview, key: str, namespace: Namespace, mac_key: bytes | None = None, *, copy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, V) of an encoded chunk; raises :class:`ChunkRejected` on any mismatch.
    ``copy=False``: views into ``data`` (a writable buffer the caller keeps unchanged
    while it uses them) where the payload is aligned, every layer verified first."""
    view = memoryview(data).cast("B")
    f = io.BytesIO(view[: PREFIX + MAX_HEADER + 32])  # BytesIO copies: the header's bytes at most
    meta = read_header(f, len(view), key, namespace, mac_key)
    dtype = DTYPES[meta.dtype]
    layer = meta.payload_bytes // max(1, 2 * meta.shape[0])
    start = f.tell()

    def check(layers: range) -> None:
        for i in layers:
            at = start + 2 * i * layer
            _check_layer(meta, i, [view[at : at + layer]], [view[at + layer : at + 2 * layer]])

    n, parts = meta.shape[0], min(_CHECKERS, meta.payload_bytes // _CHECK_PART)
    if parts < 2:
        check(range(n))
    else:  # the checksums run outside the GIL: one share of the layers per core
        shares = [_checkers.submit(check, range(n * j // parts, n * (j + 1) // parts)) for j in range(parts)]
        concurrent.futures.wait(shares)  # none still reads the value when this returns
        for done in shares:
            done.result()  # the first share's mismatch first
    if not copy and not view.readonly and start % ALIGN == 0 and meta.payload_bytes:
        both = torch.frombuffer(view[start : start + meta.payload_bytes], dtype=torch.uint8).view(dtype)
        pairs = both.view(meta.shape[0], 2, *meta.shape[1:])  # layer-major: K0 V0 K1 V1 ...
        return pairs[:, 0], pairs[:, 1]
    k, v = (torch.empty(meta.shape, dtype=dtype) for _ in range(2))
    for i in range(meta.shape[0]):
        at = start + 2 * i * layer
        bytes_of(k[i])[:] = view[at : at + layer]
        bytes_of(v[i])[:] = view[at + layer : at + 2 * layer]
    return k, v


class ChunkReader:
    """One chunk file, header verified, whose payload is read layer by layer straight
    into the caller's buffers (several layers may be read from several threads at once).
    Close it when done."""

    def __init__(self, fd: int, meta: ChunkHeader, offset: int, path: Path, direct: int | None = None) -> None:
        self.fd, self.meta, self.offset, self.path = fd, meta, offset, path
        self.direct = direct  # the same file open for direct reads (``_direct``), or None
        self.key = meta.key
        self.num_tokens = meta.shape[1]
        self.layer_bytes = meta.payload_bytes // max(1, 2 * meta.shape[0])  # one layer's K (or V)

    def read_layer(self, i: int, k: list[memoryview], v: list[memoryview]) -> None:
        """Read layer ``i``'s K into the pieces ``k`` (in order, ``layer_bytes`` in all) and
        its V into ``v``, and verify them (as :meth:`read_layers`)."""
        self.read_layers(range(i, i + 1), [k], [v])

    def read_layers(self, layers: range, k: list[list[memoryview]], v: list[list[memoryview]]) -> None:
        """Read consecutive ``layers`` (one sequential read) into their pieces: ``k[j]`` and
        ``v[j]`` for layer ``layers[j]``, and verify each layer: :class:`ChunkRejected` if
        one is not what was written (the pieces then hold garbage that nobody may read),
        OSError as the OS says."""
        pieces = [p for kj, vj in zip(k, v) for p in (*kj, *vj)]
        want = sum(p.nbytes for p in pieces)
        if want != 2 * self.layer_bytes * len(layers):
            raise ValueError(f"layers {layers} need {2 * self.layer_bytes * len(layers)} bytes of buffers, got {want}")
        at = self.offset + 2 * layers.start * self.layer_bytes
        for i in range(0, len(pieces), _IOV_MAX):
            part = pieces[i : i + _IOV_MAX]
            self._pread(part, at)
            at += sum(p.nbytes for p in part)
        for j, i in enumerate(layers):
            _check_layer(self.meta, i, k[j], v[j])

    def _pread(self, pieces: list[memoryview], at: int) -> None:
        want = sum(p.nbytes for p in pieces)
        if self.direct is not None and not resident(self.fd, at, want):
            if read_direct(self.direct, pieces, at) < want:
                raise ChunkRejected("truncated payload")
            return
        done = 0
        while pieces:  # preadv may read less than asked: go on from where it stopped
            n = os.preadv(self.fd, pieces, at + done)
            if n <= 0:
                raise ChunkRejected("truncated payload")
            done += n
            while pieces and n >= pieces[0].nbytes:
                n -= pieces[0].nbytes
                pieces = pieces[1:]
            if pieces and n:
                pieces = [pieces[0][n:], *pieces[1:]]

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


class DiskTier:
    """One directory of chunk files. ``rejected`` counts entries that failed a check
    (quarantined), ``errors`` OS errors while reading. ``direct = True``: payloads the
    page cache does not hold are read with direct I/O where the file system allows it
    (see ``_direct``, which says how; off by default, as it measured slower here)."""

    def __init__(self, root: str | os.PathLike[str], namespace: Namespace, *, mac_key: bytes | None = None) -> None:
        self.root = Path(root)
        self.namespace = namespace
        self.mac_key = mac_key
        self.quarantine = self.root / "quarantine"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.quarantine.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"disk tier: cannot create {self.root}: {exc.strerror or exc}") from exc
        self.quarantined = 0
        self.rejected = 0
        self.errors = 0
        self.direct = False
        self._remove_stale_temporaries()

    def path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}{SUFFIX}"

    def exists(self, key: str) -> bool:
        return _KEY.fullmatch(key) is not None and os.path.lexists(self.path(key))

    def write(self, key: str, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write a chunk atomically (``encode``'s bytes); returns the file size. An OS error
        (disk full, read-only, gone) raises :class:`StoreError` and leaves no file behind."""
        path = self.path(key)
        parts = encode_parts(key, self.namespace, k, v, self.mac_key)
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
                self._quarantine(path)  # a directory, FIFO or link squatting on the name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"disk tier: writing chunk {key} to {self.root} failed: {exc.strerror or exc}") from exc
        return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

    def open(self, key: str) -> ChunkReader | None:
        """A reader of the chunk, its header verified, or None (a miss) if absent,
        unreadable or invalid (then quarantined)."""
        path = self.path(key)
        try:
            with self._open(path) as (f, size, _):
                if self.direct and hasattr(os, "posix_fadvise"):  # no read-ahead to fetch twice
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
                meta = read_header(f, size, key, self.namespace, self.mac_key)
                direct = reopen_direct(f.fileno()) if self.direct else None
                return ChunkReader(os.dup(f.fileno()), meta, f.tell(), path, direct)
        except FileNotFoundError:
            return None
        except ChunkRejected:
            self.reject(key)
        except OSError:
            self.errors += 1
        return None

    def reject(self, key: str) -> None:
        """Count the chunk's file as rejected and quarantine it."""
        self.rejected += 1
        self._quarantine(self.path(key))

    def _open(self, path: Path) -> _Opened:
        """Open a regular file without following links or blocking; ChunkRejected otherwise."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ChunkRejected("a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ChunkRejected("not a regular file")
        return _Opened(os.fdopen(fd, "rb", buffering=0), st.st_size, st.st_mtime)

    def _quarantine(self, path: Path) -> None:
        try:
            os.replace(path, self.quarantine / f"{path.name}.{uuid.uuid4().hex[:8]}")
            self.quarantined += 1
        except OSError:
            pass  # gone already (another process), or the directory is read-only: stays a miss

    def delete(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.path(key).unlink()

    def scan(self) -> list[DiskEntry]:
        """Every valid entry on disk, oldest first (headers only; bad entries quarantined)."""
        entries = []
        try:
            names = sorted(p for p in self.root.glob(f"*{SUFFIX}"))
        except OSError:
            return []
        for path in names:
            key = path.name.removesuffix(SUFFIX)
            if not _KEY.fullmatch(key):
                self.rejected += 1
                self._quarantine(path)
                continue
            try:
                with self._open(path) as (f, size, mtime):
                    meta = read_header(f, size, key, self.namespace, self.mac_key)
            except FileNotFoundError:
                continue
            except ChunkRejected:
                self.rejected += 1
                self._quarantine(path)
                continue
            except OSError:
                self.errors += 1
                continue
            entries.append(DiskEntry(key, path, size, meta.shape[1], mtime))
        return sorted(entries, key=lambda e: e.mtime)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files whose writer process is gone (killed mid-write)."""
        for tmp in self.root.glob(".*.tmp"):
            m = _TMP.fullmatch(tmp.name)
            if m is None:
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or _alive(pid):
                continue
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Opened:
    """``with tier._open(path) as (f, size, mtime)``."""

    def __init__(self, f: IO[bytes], size: int, mtime: float) -> None:
        self.f, self.size, self.mtime = f, size, mtime

    def __enter__(self) -> tuple[IO[bytes], int, float]:
        return self.f, self.size, self.mtime

    def __exit__(self, *exc: object) -> None:
        self.f.close()
