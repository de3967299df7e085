"""TieredStore: chunk KV in device pool → host memory → local disk (→ remote), LRU with demotion.

A chunk is looked up by key (:func:`chunk_key`: the namespace and the token ids, so a key
names exactly one KV). ``fetch`` brings it into the device pool (promoting it from host,
disk or the remote tier) and returns its pages; ``put`` stores new KV. When the pool is
full, the least recently used unpinned chunk is demoted to host memory; when host memory
is over capacity, the least recently used host chunk goes to disk; when the disk is over
capacity, the oldest file is dropped.

Ownership. Every page of the pool has exactly one owner at every moment: the free list,
one stored chunk, or one caller that was lent it (:meth:`allocate`, given back with
:meth:`release` or handed to the store by :meth:`commit`). :meth:`audit` checks this.

Pins. A pin keeps a chunk on the device tier. Pins are counted per holder (a request's
plan, a :meth:`pin` block, or any hashable the caller passes): ``unhold`` releases only
what that holder holds, and nothing (a commit, a put, a promotion) resets another
holder's pins.

Concurrency of requests (the store itself is serialised by a lock; callers may use it
from several threads):

- Two open requests that miss the same chunk both compute it, each into its own lent
  pages. The first :meth:`commit` stores its pages. A later commit of the same key, while
  the first copy is still on the device, gives its pages back to the free list and
  returns the stored copy's pages, pinned for the committing holder: the request must
  use the pages ``commit`` returns (``Plan.commit`` updates ``Plan.pages``). If the first
  copy has meanwhile moved to the host or disk tier, the later commit's pages become the
  device copy. Either way no request ever reads pages another owner can reuse.
- A request that ends without committing (``Plan.close`` / ``Plan.abort``) gives back
  every page it was lent and every pin it holds, once; a second close does nothing.
- A chunk that occurs several times in one request is fetched, filled and pinned once;
  all its occurrences share its pages.

Failures leave every chunk where it was. A promotion that cannot get pages leaves the
chunk on its tier and raises :class:`StoreError`. A demotion whose copy fails leaves the
chunk on the tier it was on: when the disk refuses a write (full, read-only, gone), the
chunk stays in host memory, which may then exceed its budget by that one chunk (a
``RuntimeWarning``, counted in ``stats.disk_errors``); a call that needs more host room
while the disk still refuses raises :class:`StoreError` from the OS error. Everything
that needs no room keeps working, and the store recovers by itself when the disk does.
A chunk is only ever dropped by eviction from the last tier.

Promotion. Host or disk → device moves a chunk in steps of layers (1, 1, 2, 4, ...) on the
store's mover threads (``_promote``): into runs of consecutive pages with one ``copy_``
each from the host tier, and with one ``preadv`` per step straight into the pool's pages
(a reused staging buffer off the cpu) from the disk, each layer's checksum checked before
the layer counts as moved. ``fetch`` waits for the whole chunk unless it is given a
:class:`Loading` (``store.loading()``), whose ``wait(layer)`` lets a request compute
layer 0 while later layers still move. (From the host to a pool on the cpu, a chunk moves
whole, in the caller: there is no copy engine to overlap with.) A
chunk whose promotion fails is dropped (a miss from then on); its pages stay owned (by a
"failed" entry in :meth:`audit`) until the request that was promoting it lets go.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import os
import threading
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from kvfuse._errors import InvalidValueError, StoreError
from kvfuse.store._auth import load_mac_key
from kvfuse.store._disk import ChunkReader, DiskTier, check_key
from kvfuse.store._keys import Namespace
from kvfuse.store._pool import HostCopies, KVPool
from kvfuse.store._promote import Loading, Promotion, move_from_disk, move_from_host, promotion_steps
from kvfuse.store._remote import RemoteTier

TIERS = ("device", "host", "disk", "remote")
USER = "user"  # the holder of hold() / unhold() calls that name none
PLACING = "placing"  # the tier of a new entry while its first copy is being placed
_PLACING = object()  # the store's own pin while it moves a chunk


@dataclass
class StoreStats:
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    misses: int = 0
    puts: int = 0
    demotions: dict[str, int] = field(
        default_factory=lambda: {"device->host": 0, "host->disk": 0, "disk->drop": 0, "host->drop": 0}
    )
    bytes_moved: dict[str, int] = field(
        default_factory=lambda: {
            "device->host": 0,
            "host->disk": 0,
            "host->device": 0,
            "disk->device": 0,
            "remote->device": 0,
            "device->remote": 0,
        }
    )
    duplicate_commits: int = 0  # commits of a key already on the device (pages given back)
    disk_errors: int = 0  # failed disk writes or reads (OS errors)
    rejected: int = 0  # disk entries that failed a check (corrupt, inconsistent, forged)
    remote_failures: int = 0
    remote_corrupt: int = 0

    def hit_rate(self) -> float:
        total = sum(self.hits.values()) + self.misses
        return sum(self.hits.values()) / total if total else 0.0


@dataclass(eq=False)  # entries are compared by identity (list.remove, ``is``)
class _Entry:
    key: str
    num_tokens: int
    nbytes: int
    tier: str
    pages: list[int] | None = None
    host: tuple[torch.Tensor, torch.Tensor] | None = None  # padded (KVPool.host_buffers)
    promotion: Promotion | None = None  # moving into ``pages``; cleared by _reap once done
    holders: collections.Counter[Hashable] = field(default_factory=collections.Counter)

    @property
    def pins(self) -> int:
        return sum(self.holders.values())


class TieredStore:
    """Chunk KV across a device pool, host memory, a disk directory and a remote tier.

    Args:
        namespace: the model and KV layout; part of every key.
        pool: the device tier (its pages are what attention reads).
        host_bytes: capacity of the host tier (0: none).
        disk_dir: the disk tier's directory (None: none). Several processes may share one.
        disk_bytes: capacity of the disk tier.
        remote: a remote tier (Mooncake Store): looked up on a local miss, new chunks
            published to it; its failures degrade to the local tiers, never fail a call.
        mac_key_env, mac_key_file: where the key of the authenticated mode is (an
            environment variable holding it as hex, or a file holding its raw bytes).
            With a key, every disk entry carries a keyed blake2b MAC and one without a
            valid MAC is a miss (counted in ``stats.rejected``). See the README's threat
            model.
    """

    def __init__(
        self,
        namespace: Namespace,
        pool: KVPool,
        *,
        host_bytes: int = 1 << 30,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int = 8 << 30,
        remote: RemoteTier | None = None,
        mac_key_env: str | None = None,
        mac_key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.namespace = namespace
        self.pool = pool
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self.mac_key = load_mac_key(env=mac_key_env, file=mac_key_file)
        self.disk = DiskTier(disk_dir, namespace, mac_key=self.mac_key) if disk_dir is not None else None
        self.stats = StoreStats()
        self.remote = remote
        if remote is not None:
            remote.mac_key = self.mac_key
        self._lock = threading.RLock()
        self._lent: set[int] = set()  # pages lent to callers (allocate / plans)
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU: oldest first
        self._moving: dict[int, _Entry] = {}  # entries whose promotion _reap has not settled yet, by id
        self._finished: collections.deque[_Entry] = collections.deque()  # of those, finished (from any thread)
        self._failed: list[_Entry] = []  # dropped after a failed promotion, pages held until unpinned
        self._copies = HostCopies(pool)  # host copies given up, reused by demotions
        self._movers: ThreadPoolExecutor | None = None
        self.movers = 2  # threads that promote chunks (read, verify, copy), started on first use
        self.host_layerwise = self.pool.device.type != "cpu"  # see "Promotion" above
        self._stage = threading.local()  # per mover thread: a host staging pair for pools off the cpu
        self._host_mover = functools.partial(move_from_host, pool)  # one object: host steps of a range move together
        self._host_whole = functools.partial(move_from_host, pool, team=True)  # whole chunks, inline
        if self.disk is not None:  # rebuild the index from disk
            for e in self.disk.scan():
                self._entries[e.key] = _Entry(e.key, e.num_tokens, e.nbytes, "disk")
        self._disk_seen = (self.disk.rejected, self.disk.errors) if self.disk is not None else (0, 0)

    # -- queries -------------------------------------------------------------------------

    def tier(self, key: str) -> str | None:
        """Where the chunk is now (None if not stored); does not touch the LRU order."""
        with self._lock:
            self._reap()
            e = self._entries.get(key)
            if e is not None:
                return e.tier
            if self.disk is not None and self.disk.exists(key):
                return "disk"
            return None

    def used(self, tier: str) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if e.tier == tier)

    def pins(self, key: str) -> dict[Hashable, int]:
        """The chunk's pins by holder (empty if none or not stored)."""
        with self._lock:
            e = self._entries.get(key)
            return dict(e.holders) if e is not None else {}

    def __contains__(self, key: str) -> bool:
        return self.tier(key) is not None

    def audit(self) -> dict[str, list[int]]:
        """Who owns each page: ``{"free": [...], "lent": [...], <key>: [...] for chunks on
        the device}``. Raises :class:`StoreError` if a page has no owner or two."""
        with self._lock:
            self._reap()
            owners: dict[str, list[int]] = {"free": self.pool.free_list(), "lent": sorted(self._lent)}
            for e in self._failed:
                owners[f"failed:{e.key}:{id(e)}"] = list(e.pages or [])
            for e in self._entries.values():
                if e.tier == "device":
                    if not e.pages and e.num_tokens:
                        raise StoreError(f"chunk {e.key} is on the device tier without pages")
                    owners[e.key] = list(e.pages or [])
                elif e.pages is not None:
                    raise StoreError(f"chunk {e.key} on the {e.tier} tier still has pages {e.pages}")
            seen = collections.Counter(p for pages in owners.values() for p in pages)
            twice = sorted(p for p, n in seen.items() if n > 1)
            missing = sorted(set(range(self.pool.num_pages)) - set(seen))
            if twice or missing or len(seen) != self.pool.num_pages:
                raise StoreError(f"page ownership broken: owned twice {twice}, owned by nobody {missing}")
            return owners

    # -- pages lent to callers ----------------------------------------------------------------

    def allocate(self, num_tokens: int) -> list[int]:
        """Pages for ``num_tokens`` tokens, lent to the caller (making room by demotion if
        needed). Give them back with :meth:`release`, or to the store with :meth:`commit`."""
        with self._lock:
            pages = self._alloc(self.pool.pages_for(num_tokens))
            self._lent.update(pages)
            return pages

    def release(self, pages: Iterable[int]) -> None:
        """Give back pages lent by :meth:`allocate`; raises (changing nothing) if any page
        is not lent, so a double release cannot free pages another owner holds."""
        with self._lock:
            pages = list(pages)
            bad = [p for p in pages if p not in self._lent]
            if bad or len(set(pages)) != len(pages):
                raise StoreError(f"release of pages that are not lent (or repeated): {bad or pages}")
            self._lent.difference_update(pages)
            self.pool.release(pages)

    # -- the main calls --------------------------------------------------------------------

    def loading(self) -> Loading:
        """A handle for :meth:`fetch` calls whose promotions a request waits for layer by
        layer (``wait(layer)``) instead of whole (see the module docstring)."""
        return Loading(self._mover_pool(), self.movers)

    def _mover_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._movers is None:
                self._movers = ThreadPoolExecutor(self.movers, thread_name_prefix="kvfuse-mover")
            return self._movers

    def fetch(self, key: str, *, holder: Hashable | None = None, loading: Loading | None = None) -> list[int] | None:
        """The chunk's pages in the device pool (promoted there if needed), or None on a
        miss. With ``holder``, the chunk is pinned for that holder in the same step. With
        ``loading`` (and a holder), a promotion is only started: wait on ``loading``
        before reading a layer."""
        if loading is not None and holder is None:
            raise InvalidValueError("holder", "a holder with loading= (the pages stay pinned while they fill)", None)
        with self._lock:
            e = self._settled(key, loading)
            if e is None and self.disk is not None and self.disk.exists(key):
                e = _Entry(key, 0, 0, "disk")  # written by another process
                self._entries[key] = e
                self._entries.move_to_end(key, last=False)
            if e is None:
                pages = self._fetch_remote(key)
            elif e.tier == "device":
                self.stats.hits["device"] += 1
                self._entries.move_to_end(key)
                pages = e.pages
                if e.promotion is not None and loading is not None:  # still moving: wait for it too
                    loading.add(e.promotion)
            else:
                pages = self._promote(e, loading)
            if pages is not None and holder is not None:
                self._entries[key].holders[holder] += 1
            return None if pages is None else list(pages)

    def _promote(self, e: _Entry, loading: Loading | None) -> list[int] | None:
        """Host or disk → device; on failure to get pages the chunk stays where it was."""
        reader: ChunkReader | None = None
        if e.tier == "host":
            assert e.host is not None
            num_tokens, source = e.num_tokens, "host"
        else:
            assert self.disk is not None
            reader = self.disk.open(e.key)
            self._sync_disk_counters()
            if reader is None:  # corrupt, forged or vanished: a miss, never wrong KV
                if self._entries.get(e.key) is e and not e.holders:
                    del self._entries[e.key]
                self.stats.misses += 1
                return None
            num_tokens, source = reader.num_tokens, "disk"
        try:
            pages = self._alloc_for(e, self.pool.pages_for(num_tokens))
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        if reader is None and loading is None:  # whole, here
            assert e.host is not None
            host = e.host
            placed = self._place(e, pages, *host, num_tokens, "host->device")
            self._copies.give_back(host)
            return placed
        # Host chunks move whole when not ``host_layerwise``: on the cpu a layer-wise move
        # only competes with the model for the same cores and memory bandwidth (measured
        # 15 ms slower at 4k, README); a GPU's copy engine runs beside its compute. With a
        # loading they move when it starts, all of a request's in one call (inline).
        whole = reader is None and not self.host_layerwise
        layers = self.namespace.num_layers
        if whole:
            steps = [range(layers)]
        elif reader is None:  # host steps of at least 1 MiB
            steps = promotion_steps(layers, self._nbytes(num_tokens) // layers)
        else:  # a disk step's cost is its read, not Python: layers 1, 2-3, ... come sooner
            steps = promotion_steps(layers)
        fence = self.pool.fence()  # the movers' copies wait for whatever may still read these pages
        if reader is not None:
            assert self.disk is not None
            move = functools.partial(move_from_disk, self.pool, self.disk, reader, pages, self._stage, after=fence)
            e.promotion = Promotion(e.key, steps, move, functools.partial(self._landed, e, reader.close), source)
        else:
            assert e.host is not None
            finish = functools.partial(self._landed, e, functools.partial(self._copies.give_back, e.host))
            mover = self._host_whole if whole else self._host_mover
            e.promotion = Promotion(
                e.key, steps, None, finish, source, batch=(mover, (pages, *e.host, fence)), inline=whole
            )
        self._moving[id(e)] = e
        e.tier, e.pages, e.host = "device", pages, None
        e.num_tokens, e.nbytes = num_tokens, self._nbytes(num_tokens)
        self._entries.move_to_end(e.key)
        if loading is not None:
            loading.add(e.promotion)
            return pages
        return pages if self._settled(e.key, None) is e else None  # run and counted (hit or miss) there

    def _settled(self, key: str, loading: Loading | None) -> _Entry | None:
        """The chunk's entry once any promotion of it that this call cannot join is over
        (a failed one dropped: None)."""
        e = self._entries.get(key)
        p = e.promotion if e is not None else None
        if p is not None and (loading is None or p.error is not None):
            p.start(self._mover_pool())  # queued here if its own request never did
            p.wait_finished()
            self._reap()
            e = self._entries.get(key)
        return e

    def _reap(self) -> None:
        """Settle finished promotions: a failed chunk leaves the index (its pages stay with
        its holders until they let go); free the pages of failed chunks nobody holds."""
        while self._finished:  # only those finished since the last call: a request's 90 fetches reap in O(90)
            e = self._finished.popleft()
            if self._moving.pop(id(e), None) is None:
                continue
            p, e.promotion = e.promotion, None
            assert p is not None
            if p.error is None:
                self.stats.hits[p.source] += 1
                self.stats.bytes_moved[f"{p.source}->device"] += e.nbytes
            else:
                del self._entries[e.key]
                self.stats.misses += 1
                self._failed.append(e)
        self._sync_disk_counters()
        for e in [e for e in self._failed if not e.holders]:
            self._failed.remove(e)
            self.pool.release(e.pages or [])

    def _landed(self, e: _Entry, finish: Callable[[], None]) -> None:
        """A promotion of ``e`` is over (called by its last step, on any thread): ``finish``,
        then it is for :meth:`_reap` to settle."""
        try:
            finish()
        finally:
            self._finished.append(e)

    def _sync_disk_counters(self) -> None:
        """Add the disk tier's new rejections and read errors (counted by the movers too)."""
        if self.disk is not None:
            rejected, errors = self.disk.rejected, self.disk.errors
            self.stats.rejected += rejected - self._disk_seen[0]
            self.stats.disk_errors += errors - self._disk_seen[1]
            self._disk_seen = (rejected, errors)

    def _fetch_remote(self, key: str) -> list[int] | None:
        """A local miss: look in the remote tier before the caller recomputes."""
        loaded = self.remote.get(key) if self.remote is not None else None
        self._sync_remote_counters()
        if loaded is None:
            self.stats.misses += 1
            return None
        k, v = loaded
        e = _Entry(key, k.shape[1], self._nbytes(k.shape[1]), PLACING)
        self._entries[key] = e
        try:
            # not on torch's OpenMP team: it spins after the copy, on the cores the transfer
            # engine's threads need for the next get (measured 26-29 % of raw TCP, not 43-46)
            pages = self._to_device(e, k, v, team=False)
        except StoreError:
            del self._entries[key]
            raise
        self.stats.hits["remote"] += 1
        self.stats.bytes_moved["remote->device"] += 2 * k.numel() * k.element_size()
        return pages

    def _publish(self, key: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.remote is not None and self.remote.put(key, k, v):
            self.stats.bytes_moved["device->remote"] += 2 * k.numel() * k.element_size()
        self._sync_remote_counters()

    def _sync_remote_counters(self) -> None:
        if self.remote is not None:
            self.stats.remote_failures, self.stats.remote_corrupt = self.remote.failures, self.remote.corrupt

    def put(self, key: str, k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """Store a chunk's K/V; returns its pages in the device pool. A key names its KV, so
        a chunk already on the device keeps the copy it has.

        k, v: [num_layers, num_tokens, num_kv_heads, head_dim], the namespace's dtype
        (un-rotated keys)
        """
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise StoreError(f"chunk KV must be torch tensors, got {type(k).__name__} and {type(v).__name__}")
        check_key(key)
        want = self.namespace.chunk_shape(k.shape[1]) if k.dim() == 4 else None
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.namespace.torch_dtype:
            raise StoreError(
                f"chunk KV must be [num_layers, num_tokens, num_kv_heads, head_dim] = "
                f"{want or self.namespace.chunk_shape(0)} {self.namespace.dtype}, "
                f"got k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
            )
        with self._lock:
            self.stats.puts += 1
            e = self._settled(key, None)
            if e is not None and e.tier == "device":
                self._entries.move_to_end(key)
                return list(e.pages or [])
            new = e is None
            if new:
                e = self._entries[key] = _Entry(key, k.shape[1], self._nbytes(k.shape[1]), PLACING)
            assert e is not None
            try:
                pages = self._to_device(e, k, v)
            except StoreError:
                if new:
                    del self._entries[key]
                raise
            self._publish(key, k, v)
            return pages

    def commit(self, key: str, pages: list[int], num_tokens: int, *, holder: Hashable | None = None) -> list[int]:
        """Hand lent ``pages``, into which the caller wrote the chunk's KV (e.g. by
        ``append_kv`` during prefill), to the store. Returns the pages that hold the chunk
        from now on: ``pages``, or, if the chunk is already on the device, the stored copy's
        (``pages`` are then given back). With ``holder``, the chunk is pinned for it."""
        check_key(key)
        with self._lock:
            need = self.pool.pages_for(num_tokens)
            if len(pages) != need or any(p not in self._lent for p in pages) or len(set(pages)) != need:
                raise StoreError(f"commit of {key}: expected {need} distinct lent pages, got {pages}")
            self.stats.puts += 1
            e = self._settled(key, None)
            if e is not None and e.tier == "device":
                self.stats.duplicate_commits += 1
                self.release(pages)
                kept = list(e.pages or [])
            else:
                self._lent.difference_update(pages)
                if e is None:
                    e = self._entries[key] = _Entry(key, num_tokens, self._nbytes(num_tokens), "device")
                if e.host is not None:
                    self._copies.give_back(e.host)
                e.tier, e.pages, e.host = "device", list(pages), None
                kept = list(pages)
                if self.remote is not None and self.remote.up:  # publish for other machines
                    self._publish(key, *self.pool.read(kept, num_tokens))
            self._entries.move_to_end(key)
            if holder is not None:
                e.holders[holder] += 1
            return kept

    def hold(self, key: str, holder: Hashable = USER) -> None:
        """Pin one chunk for ``holder`` (counted): never evicted from the device until the
        holder's last :meth:`unhold`."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                raise StoreError(f"hold of {key}: not stored")
            e.holders[holder] += 1

    def unhold(self, key: str, holder: Hashable = USER) -> None:
        """Release one of ``holder``'s pins of the chunk; raises if the holder holds none."""
        with self._lock:
            self._reap()
            e = self._entries.get(key)
            if e is None or e.holders[holder] <= 0:  # or a failed promotion's chunk it held
                e = next((f for f in self._failed if f.key == key and f.holders[holder] > 0), None)
            if e is None:
                raise StoreError(f"unhold of {key}: {holder!r} holds no pin on it")
            e.holders[holder] -= 1
            if not e.holders[holder]:
                del e.holders[holder]
            self._reap()

    @contextlib.contextmanager
    def pin(self, keys: Iterable[str]) -> Iterator[None]:
        """Within this block the stored chunks among ``keys`` are never evicted."""
        holder = ("pin", next(_pin_ids))
        with self._lock:
            held = [k for k in dict.fromkeys(keys) if k in self._entries]
            for k in held:
                self.hold(k, holder)
        try:
            yield
        finally:
            with self._lock:
                for k in held:
                    self.unhold(k, holder)

    # -- placement and eviction -------------------------------------------------------------

    def _nbytes(self, num_tokens: int) -> int:
        return self.namespace.chunk_nbytes(num_tokens)

    def _alloc(self, need: int) -> list[int]:
        self._reap()
        pages = self.pool.alloc(need)
        while pages is None:
            if need > self.pool.num_pages:
                raise StoreError(f"{need} pages asked, the pool has {self.pool.num_pages}")
            self._demote_one_device()
            pages = self.pool.alloc(need)
        return pages

    def _to_device(self, e: _Entry, k: torch.Tensor, v: torch.Tensor, *, team: bool = True) -> list[int]:
        """Write (k, v) into new pages and make them ``e``'s device copy. ``e`` is pinned
        while room is made, so it is never its own victim; on failure nothing changed."""
        return self._place(e, self._alloc_for(e, self.pool.pages_for(k.shape[1])), k, v, k.shape[1], team=team)

    def _place(
        self,
        e: _Entry,
        pages: list[int],
        k: torch.Tensor,
        v: torch.Tensor,
        num_tokens: int,
        source: str = "",
        *,
        team: bool = True,
    ) -> list[int]:
        """Write (k, v) (``num_tokens`` tokens, maybe padded) into ``pages`` and make them
        ``e``'s device copy, counted as a hit of ``source``; on failure the pages go back
        and ``e`` is unchanged. ``team``: :meth:`KVPool.write`'s."""
        try:
            self.pool.write(pages, k, v, team=team)
        except Exception as exc:
            self.pool.release(pages)
            raise StoreError(f"writing chunk {e.key} into the device pool failed: {exc}") from exc
        e.tier, e.pages, e.host = "device", pages, None
        e.num_tokens, e.nbytes = num_tokens, self._nbytes(num_tokens)
        self._entries.move_to_end(e.key)
        if source:
            self.stats.hits[source.split("->")[0]] += 1
            self.stats.bytes_moved[source] += e.nbytes
        return list(pages)

    def _alloc_for(self, e: _Entry, need: int) -> list[int]:
        """``need`` pages for ``e``, which is pinned meanwhile so it is never its own victim."""
        e.holders[_PLACING] += 1
        try:
            return self._alloc(need)
        finally:
            e.holders[_PLACING] -= 1
            del e.holders[_PLACING]

    def _victim(self, tier: str) -> _Entry | None:
        """The least recently used chunk of ``tier`` that nobody pins and nothing moves."""
        return next((e for e in self._entries.values() if e.tier == tier and not e.pins and e.promotion is None), None)

    def discard(self, key: str) -> bool:
        """Forget a chunk on every local tier (its pages freed, its host copy and disk file
        dropped; the remote tier keeps its copy): e.g. a document that changed. False if it
        was not stored; a pinned or moving chunk raises :class:`StoreError`."""
        with self._lock:
            self._reap()
            e = self._entries.get(key)
            if e is None:
                return False
            if e.pins or e.promotion is not None:
                raise StoreError(f"discard of {key}: pinned or moving ({dict(e.holders)})")
            if e.pages is not None:
                self.pool.release(e.pages)
            if e.host is not None:
                self._copies.give_back(e.host)
            if self.disk is not None:
                self.disk.delete(key)
            del self._entries[key]
            return True

    def demote(self, key: str, to: str = "host") -> None:
        """Move a chunk down to the ``to`` tier ("host" or "disk") now, as eviction would:
        e.g. to keep the device pool for other work, or to stage a benchmark. A chunk
        already there or lower stays; a pinned one raises :class:`StoreError`."""
        if to not in ("host", "disk") or (to == "disk" and self.disk is None):
            raise InvalidValueError("to", '"host", or "disk" for a store with a disk tier', to)
        with self._lock:
            self._reap()
            e = self._entries.get(key)
            if e is None:
                raise StoreError(f"demote of {key}: not stored")
            if e.pins or e.promotion is not None:
                raise StoreError(f"demote of {key}: pinned or moving ({dict(e.holders)})")
            if e.tier == "device":
                self._demote_device(e)
            if to == "disk" and e.tier == "host":
                self._host_to_disk(e)

    def _demote_one_device(self) -> None:
        e = self._victim("device")
        if e is None or e.pages is None:
            raise StoreError(f"device pool full: {self.pool.num_pages} pages, {len(self._lent)} lent, the rest pinned")
        self._demote_device(e)

    def _demote_device(self, e: _Entry) -> None:
        assert e.pages is not None
        self._trim_host(room=e.nbytes)  # raises if the disk refuses: e stays on the device
        try:
            room = self.host_bytes - self.used("host")
            k, v = self.pool.read(e.pages, out=self._copies.take(len(e.pages), room))
        except Exception as exc:
            raise StoreError(f"demoting chunk {e.key} to host memory failed: {exc}") from exc
        self.pool.release(e.pages)
        e.pages, e.host, e.tier = None, (k, v), "host"
        self.stats.demotions["device->host"] += 1
        self.stats.bytes_moved["device->host"] += e.nbytes
        try:
            self._trim_host(room=0)
        except StoreError as exc:  # the chunk stays in host memory, over budget by one chunk
            warnings.warn(f"kvfuse store: {exc}; kept in host memory", RuntimeWarning, stacklevel=4)

    def _trim_host(self, room: int) -> None:
        """Move host chunks to disk (or drop them, without a disk) until ``room`` more bytes
        fit. A disk write that fails leaves its chunk in host memory and raises StoreError."""
        while self.used("host") + room > self.host_bytes:
            e = self._victim("host")
            if e is None:
                return
            assert e.host is not None
            if self.disk is None:
                del self._entries[e.key]
                self._copies.give_back(e.host)
                self.stats.demotions["host->drop"] += 1
                continue
            self._host_to_disk(e)

    def _host_to_disk(self, e: _Entry) -> None:
        """Write a host chunk's file and drop its host copy; StoreError (and no change) if
        the disk refuses."""
        assert self.disk is not None and e.host is not None
        try:
            nbytes = self.disk.write(e.key, e.host[0][:, : e.num_tokens], e.host[1][:, : e.num_tokens])
        except StoreError:
            self.stats.disk_errors += 1
            raise
        self._copies.give_back(e.host)
        e.nbytes, e.tier, e.host = nbytes, "disk", None
        self.stats.demotions["host->disk"] += 1
        self.stats.bytes_moved["host->disk"] += e.nbytes
        self._trim_disk()

    def _trim_disk(self) -> None:
        assert self.disk is not None
        while self.used("disk") > self.disk_bytes:
            e = self._victim("disk")
            if e is None:
                return
            self.disk.delete(e.key)
            del self._entries[e.key]
            self.stats.demotions["disk->drop"] += 1


_pin_ids = itertools.count()
