"""Reads of chunk payloads with direct I/O (``O_DIRECT``) where the page cache lacks
them (``DiskTier.direct``), and ``drop_cache`` for cold reads.

Why: a buffered cold read costs the cores the kernel's copy out of the page cache. On
the 2-core VM, a sequential 190 MB read took 56 ms of CPU at 1.0 GB/s buffered and
12 ms at 1.5 GB/s direct, and a concurrent warm read slowed an attention gather 10x.

How, per read of a run of layers:

1. :func:`resident` asks the kernel whether the page cache holds every page of the range
   (``mincore`` on a fresh read-only mapping of the file: no page is touched, and no
   read-ahead starts); if it does, the caller reads buffered, at memory speed (a chunk
   written or read lately);
2. otherwise the block-aligned span is read directly, window by window, into this
   thread's aligned staging buffer, and the wanted bytes are copied into the caller's
   pieces (a memcpy: about 10 ms of one core for 190 MB).

The reader of a direct tier opens each file with read-ahead off
(``POSIX_FADV_RANDOM``): the header's read would otherwise pull most of a small chunk
file into the page cache (``read_ahead_kb`` = 8192 here), and the direct read would
fetch it a second time. The first version probed with ``preadv(RWF_NOWAIT)``, whose miss
starts that same read-ahead.

Why it is still off by default (``DiskTier.direct = False``), as measured here: each
mover reads one window at a time, so the disk sees one request per mover, while the
kernel's read-ahead keeps many in flight. Results, direct against buffered:

- ``bench store`` 8 × 512, cold: 55–60 ms against 60 ms whole, 47–48 against 43–55 ms
  layer by layer (with the ``RWF_NOWAIT`` probe it was 64 % of the cold read against
  140 %);
- ``bench store`` 90 × 45, cold: 116 against 68–94 ms; with the files cached, the probe
  adds about 25 µs per read (27 against 21 ms for 8 × 512);
- RAG reuse from disk at 4k (``bench rag --tier``, median of seven): 1.68× the device
  tier's TTFT, twice, against 1.34–1.45× buffered.

More requests in flight did not help on this virtual disk: a cold 192 MB file read at
2.7–2.8 GB/s buffered, and at 0.8–2.5 GB/s direct with 1–16 requests of 256 KiB–1 MiB
from threads. Direct reads pay where the disk rewards them (local NVMe, with
``io_uring`` keeping many requests in flight), and with a format whose layers are
block-aligned whole pages, so that they land in the pool with no staging copy.

Where the OS offers no ``O_DIRECT`` on the file system (e.g. tmpfs) or no ``mincore``,
:func:`reopen_direct` gives None and the reader reads buffered. Nothing here checks
bytes: the caller verifies what it reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from collections.abc import Iterable

import numpy as np

BLOCK = 4096  # direct I/O's alignment of offsets, lengths and buffers (>= any logical block)
WINDOW = 8 << 20  # bytes per direct read, and the staging buffer's most

_local = threading.local()
_PAGE = mmap.PAGESIZE


def _libc() -> ctypes.CDLL | None:
    """libc with ``mmap``, ``mincore`` and ``munmap`` typed, or None where it lacks them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident(fd: int, at: int, nbytes: int) -> bool:
    """Whether the page cache holds every byte of ``fd`` in ``[at, at + nbytes)``; False
    where the kernel will not say. Reads nothing and starts no read-ahead."""
    if _LIBC is None:
        return False
    start = at - at % _PAGE
    length = at + nbytes - start
    if length <= 0:
        return True
    addr = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr is None or addr == _MAP_FAILED:
        return False
    try:
        vec = np.empty(-(-length // _PAGE), dtype=np.uint8)
        if _LIBC.mincore(addr, length, vec.ctypes.data) != 0:
            return False
        return bool((vec & 1).all())
    finally:
        _LIBC.munmap(addr, length)


def reopen_direct(fd: int) -> int | None:
    """A second descriptor of ``fd``'s file (the same inode, whatever its name became)
    open for direct reads, or None where the system cannot."""
    if not hasattr(os, "O_DIRECT") or _LIBC is None:
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:  # EINVAL: no O_DIRECT here; ENOENT: no /proc
        return None


def read_direct(dfd: int, pieces: list[memoryview], at: int) -> int:
    """Fill ``pieces`` (in order) with the bytes of ``dfd`` from offset ``at``, read
    directly in block-aligned windows; returns how many bytes it filled (fewer at the
    end of the file). OSError as the OS says."""
    want = sum(p.nbytes for p in pieces)
    stage = _stage(WINDOW)
    first = at - at % BLOCK
    end = -(-(at + want) // BLOCK) * BLOCK
    filled, i, inside = 0, 0, 0  # bytes given; the piece being filled and how far into it
    for w in range(first, end, WINDOW):
        span = min(WINDOW, end - w)
        got = 0
        while got < span:
            n = os.preadv(dfd, [stage[got:span]], w + got)
            if n <= 0:
                break
            got += n
        lo = max(at - w, 0)  # the window's bytes we want: [lo, hi)
        hi = min(got, at + want - w)
        while lo < hi:
            take = min(pieces[i].nbytes - inside, hi - lo)
            pieces[i][inside : inside + take] = stage[lo : lo + take]
            lo, inside, filled = lo + take, inside + take, filled + take
            if inside == pieces[i].nbytes:
                i, inside = i + 1, 0
        if got < span:
            break
    return filled


def _stage(size: int) -> memoryview:
    """This thread's aligned staging buffer of at least ``size`` bytes (``mmap`` memory
    is page-aligned)."""
    view: memoryview | None = getattr(_local, "stage", None)
    if view is None or view.nbytes < size:
        view = _local.stage = memoryview(mmap.mmap(-1, size))
    return view


def drop_cache(paths: Iterable[str | os.PathLike[str]]) -> bool:
    """Evict the files ``paths`` from the page cache (fsync'ed first: clean pages go);
    False where the OS offers no way (``posix_fadvise``), and reads stay warm."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True
