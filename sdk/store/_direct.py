"""Reads of chunk payloads that leave the CPU to the model: page cache when the bytes are
there, direct I/O (``O_DIRECT``) when they are not.

A buffered read of a cold file costs the CPU the kernel's copy out of the page cache, at
memory bandwidth, on the cores the model's forward runs on: measured on the 2-core VM,
a 190 MB read slowed a concurrent attention gather 2x (cold) to 10x (warm), and the
disk tier's reuse TTFT was the model's time *plus* the read's. A direct read is the
device's DMA into an aligned buffer: 12 ms of CPU for the same 190 MB instead of 56,
and 1.5 GB/s instead of 1.0 here. So:

1. ``preadv(..., RWF_NOWAIT)``: the bytes if the page cache holds all of them (a chunk
   written or read lately), at memory speed;
2. otherwise one direct read per window of the block-aligned span into this thread's
   aligned staging buffer, and a copy of the wanted bytes into the caller's pieces.

Where the OS offers neither (no ``O_DIRECT`` on the file system, e.g. tmpfs; no
``RWF_NOWAIT``), the reader says so (:func:`reopen_direct` gives None) and the caller
reads buffered as before. Nothing here checks bytes: the caller verifies what it reads.
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
