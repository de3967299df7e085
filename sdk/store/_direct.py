"""Reads of chunk payloads with direct I/O (``O_DIRECT``) where the page cache lacks
them, opt-in (``DiskTier.direct = True``), and ``drop_cache`` for cold reads.

Why: a buffered cold read costs the cores the kernel's copy out of the page cache. On
the 2-core VM, a sequential 190 MB read took 56 ms of CPU at 1.0 GB/s buffered and
12 ms at 1.5 GB/s direct, and a concurrent warm read slowed an attention gather 10x.

How:

1. ``preadv(..., RWF_NOWAIT)`` gives the bytes if the page cache holds all of them (a
   chunk written or read lately), at memory speed;
2. otherwise the block-aligned span is read directly, window by window, into this
   thread's aligned staging buffer, and the wanted bytes are copied into the caller's
   pieces.

Why it is off by default, as measured here. A miss of the ``RWF_NOWAIT`` probe still
starts the kernel's read-ahead of the range, so the direct read fetches the same bytes
a second time. Here the header's read-ahead (``read_ahead_kb`` = 8192) also brings in
most of each small chunk file before any payload is read. Results:

- RAG reuse from disk at 4k, over seven runs each: median TTFT 0.33 s buffered, 0.35 s
  direct;
- ``bench store`` 8 × 512, cold and layer by layer: 140 % of the cold sequential read
  buffered, 64 % direct.

Two changes would make it pay:

- a residency probe without side effects (``mincore`` on a mapping);
- a file format whose layers are block-aligned whole pages, so that direct reads land
  in the pool with no staging copy.

Where the OS offers neither ``O_DIRECT`` on the file system (e.g. tmpfs) nor
``RWF_NOWAIT``, :func:`reopen_direct` gives None and the reader reads buffered. Nothing
here checks bytes: the caller verifies what it reads.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterable

BLOCK = 4096  # direct I/O's alignment of offsets, lengths and buffers (>= any logical block)
WINDOW = 8 << 20  # bytes per direct read, and the staging buffer's most

_local = threading.local()


def reopen_direct(fd: int) -> int | None:
    """A second descriptor of ``fd``'s file (the same inode, whatever its name became)
    open for direct reads, or None where the system cannot."""
    if not hasattr(os, "O_DIRECT") or not hasattr(os, "RWF_NOWAIT"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:  # EINVAL: no O_DIRECT here; ENOENT: no /proc
        return None


def read_cached(fd: int, pieces: list[memoryview], at: int) -> bool:
    """Fill ``pieces`` (in order) from ``fd`` at offset ``at`` if the page cache holds every
    byte; False (pieces partly written) if it does not."""
    want = sum(p.nbytes for p in pieces)
    try:
        return os.preadv(fd, pieces, at, os.RWF_NOWAIT) == want
    except (BlockingIOError, OSError):  # EAGAIN: not cached; EOPNOTSUPP: an old kernel
        return False


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
