"""PageCache, Page and PageBuilder: the public API and every lifetime rule.

Ownership is by reference. A Page (or PageBuilder) holds its C record through a hold
(csrc/hold.c): memory the Page owns, with a C finalizer (ffi.gc), both made with the Page
before the C call that fills the hold. When the Page's last reference goes or the
collector frees it, the finalizer lets go of the record: one CAS onto the C release queue,
no system call, no lock, and no Python frame, so no KeyboardInterrupt can cut it short.
The cache's reaper thread removes the files in batches. A record holds its C cache; the
cache lives until its PageCache and its last record are gone. A Page whose finalizer has
run (it may live on: resurrection, gc.garbage) finds its hold empty and raises
PageReleasedError. See README.md, "Lifetimes".
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import mmap
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from . import _arrays, _explain, _folders
from . import _bindings as native
from ._explain import LivePage
from .errors import CacheClosedError, CacheFullError, PageLostError, PageReleasedError

if TYPE_CHECKING:
    import numpy

__all__ = ["PageCache", "Page", "BorrowedPage", "PageBuilder", "CacheStats"]

_MAX_DELAY_LIMIT = 1e9  # seconds (31 years): keeps the C side's nanoseconds in range

#: The default ``pack_max``: pages up to this many bytes are slots in segment files (see
#: README.md, "Packed pages", for the measurements behind it).
PACK_MAX = 256 * 1024


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a cache's counters (each read atomically, not all at one instant)."""

    live_pages: int  #: written and not released
    live_bytes: int  #: their bytes
    pending: int  #: released, file not yet removed
    pending_bytes: int
    removed: int  #: files removed since the cache opened
    remove_errors: int  #: removals that failed (the file stays until close)
    written: int  #: pages written since the cache opened
    # Why pages were released; the four add up to ``released``.
    released_by_refcount: int  #: the Page's last reference went
    released_by_gc: int  #: the cycle collector freed the Page (it was in a reference cycle)
    released_explicitly: int  #: ``release()`` or the end of a ``with page:`` block
    released_at_close: int  #: still alive when the cache closed (0 until it does)
    #: what ``max_bytes`` counts, in one atomic read: what live and pending pages, writes
    #: under way, pinned pages and files whose removal failed (until close) take on disk.
    #: A page takes its whole slot if packed (4 KiB for an empty one), else its file's
    #: whole 4 KiB blocks, one at least. 0 once closed
    charged_bytes: int
    live_disk_bytes: int  #: what the live pages take on disk (their charge)
    pending_disk_bytes: int  #: what the pending pages take on disk (their charge)
    #: released and removed pages whose bytes a view still holds (one of this process's, a
    #: read under way, or a borrower's view of a page file, in any process): they stay on
    #: disk, and charged, until the last view dies; ``pinned_bytes`` is what they take
    pinned: int
    pinned_bytes: int
    #: names ``Page.hand_over()`` made that no receiver has adopted yet, and their bytes
    #: (in the folder until adopted or closed; not charged against ``max_bytes``)
    handed: int
    handed_bytes: int
    remover: str  #: "io_uring" or "loop": how this cache removes files

    @property
    def released(self) -> int:
        by_call = self.released_explicitly + self.released_at_close
        return self.released_by_refcount + self.released_by_gc + by_call


def _shutdown(handle: native.Hold, path: str, watched: weakref.WeakSet[Page] | None = None) -> None:
    """Close a cache: every file and the folder go. The finalizer of PageCache, so it must
    not reference the cache object, and it runs at exit through weakref.finalize's atexit
    hook, before module globals are torn down. ``watched``: the live pages of a
    ``warn_on_gc`` cache, to warn about when the finalizer (not close()) reclaims them."""
    # what to say, not the pages themselves: a warning must not keep a page alive
    alive = [(p.id, p.nbytes, p._where()) for p in watched if not p.released] if watched is not None else []
    if not native.cache_close(handle, path):
        return  # a forked child borrows its parent's cache; it removes nothing
    for page_id, nbytes, page_path in alive:  # after the work: a warning may raise (-W error)
        warnings.warn(
            f"page {page_id} ({nbytes} bytes) was still alive when its cache was finalized "
            f"(at exit or when the cache was collected); its bytes ({page_path}) were removed",
            ResourceWarning,
            stacklevel=2,
        )


def _shutdown_quietly(handle: Any, path: str, watched: weakref.WeakSet[Page] | None) -> None:
    try:
        _shutdown(handle, path, watched)
    except OSError:
        pass  # nothing to report to at exit or in a collection; close() raises instead


def _default_pack_max() -> int:
    raw = os.environ.get("DISKPAGES_PACK_MAX")
    if raw is None:
        return PACK_MAX
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"DISKPAGES_PACK_MAX must be a number of bytes, not {raw!r}") from None


# Every open cache, for the gc callback below (weak: it keeps none alive).
_caches: weakref.WeakSet[PageCache] = weakref.WeakSet()


class _Started(threading.local):
    """Per thread: how many collections it has started. Lets a thread tell whether
    gc.collect() collected, or returned at once because a collection was already running
    (in another thread, or in this one's finalizers: native.gc_collecting_here says which)."""

    count = 0


_started = _Started()


def _on_collection(
    phase: str,
    info: dict[str, int],
    _phase: Any = native.gc_phase,
    _take: Any = native.gc_take_releases,
    _kick: Any = native.kick,
    _caches: weakref.WeakSet[PageCache] = _caches,
    _started: _Started = _started,
) -> None:
    """gc.callbacks hook: pages dropped in the collecting thread during a collection count
    as released by the collector, and once it ends the reapers of caches with pending pages
    drain at once (in their own thread) instead of waiting for the next batch or max_delay.
    Captures what it needs as defaults: it runs at shutdown too. The C call comes first: an
    interrupt (a signal handler's exception) can still land before it, on the function's
    first instruction, and then the next collection's start corrects the mark (see
    dp_gc_phase)."""
    _phase(phase == "start")
    if phase == "start":
        _started.count += 1
        return
    if _take():
        try:
            for cache in list(_caches):
                _kick(cache._handle)  # nothing, once closed
        except Exception:
            pass  # interpreter teardown: nothing left to kick


gc.callbacks.append(_on_collection)


# How long a thread waits for another thread's collection to end before running its own.
COLLECT_WAIT = 2.0


def _collect_here(deadline: float) -> None:
    """A full collection, run by this thread. While another thread collects (its
    finalizers let other threads run), gc.collect() returns at once and collects nothing,
    not even the cycles this thread made meanwhile: then wait for that collection to end,
    until ``deadline`` (time.monotonic()), and run one of our own."""
    while True:
        before = _started.count
        gc.collect()
        if _started.count != before or native.gc_collecting_here():
            return  # ours ran, or this is a finalizer of our own collection: no one to wait for
        if time.monotonic() >= deadline or _on_collection not in gc.callbacks:
            return  # (without our hook we cannot tell whose collection ran)
        if native.gc_collecting():
            time.sleep(0.001)  # another thread's collection: wait for it to end, then ours


class PageCache:
    """Pages on disk whose files live exactly as long as their Page objects.

    ``root`` is the folder under which this cache makes its own private folder
    (``self.path``, mode 0700). ``sync`` says what is on stable storage when a write
    returns: ``"none"`` (nothing forced), ``"data"`` (the page's bytes), ``"full"`` (the bytes
    and the page's name in the folder). Released pages are removed by a C thread once
    ``batch`` are waiting or ``max_delay`` seconds have passed, or at once by
    ``remove_released()``.

    Pages of at most ``pack_max`` bytes (``PACK_MAX``, 256 KiB, by default, or what the
    environment variable DISKPAGES_PACK_MAX says; at most 1 MiB; 0 for none) are
    *packed*: each is a slot in a segment file shared with pages of its size class, reused
    in place once the page is gone, so writing and dropping one touches no file system
    metadata. Bigger pages, ``write_array()`` pages and ``allocate()`` builders have a file
    of their own. A packed page has no ``path``; everything else works alike.

    ``max_bytes`` caps the bytes on disk (see ``stats().charged_bytes``). A write that would
    pass it removes the released pages and runs the cycle collector in the writing thread,
    then tries again; with ``collect_when_full=False`` it raises CacheFullError at once
    instead and leaves the removal to the reaper (for an event loop's thread).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        sync: str = "none",
        batch: int = 64,
        max_delay: float = 0.05,
        max_bytes: int | None = None,
        warn_on_gc: bool = False,
        pack_max: int | None = None,
        collect_when_full: bool = True,
    ) -> None:
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
                raise TypeError(f"max_bytes must be an int or None, not {type(max_bytes).__name__}")
            if not 1 <= max_bytes < 2**64:
                raise ValueError(f"max_bytes must be from 1 to 2**64 - 1, not {max_bytes}")
        if pack_max is None:
            pack_max = _default_pack_max()
        if isinstance(pack_max, bool) or not isinstance(pack_max, int):
            raise TypeError(f"pack_max must be an int, not {type(pack_max).__name__}")
        if not 0 <= pack_max <= native.PACK_LIMIT:
            raise ValueError(
                f"pack_max must be from 0 (no packing) to {native.PACK_LIMIT} bytes, not {pack_max}"
            )
        if not isinstance(warn_on_gc, bool):
            raise TypeError(f"warn_on_gc must be True or False, not {warn_on_gc!r}")
        if not isinstance(collect_when_full, bool):
            raise TypeError(f"collect_when_full must be True or False, not {collect_when_full!r}")
        if sync not in native.SYNC_MODES:
            raise ValueError(f"sync must be one of {sorted(native.SYNC_MODES)}, not {sync!r}")
        if isinstance(batch, bool) or not isinstance(batch, int):
            raise TypeError(f"batch must be an int, not {type(batch).__name__}")
        if not 1 <= batch <= 2**31 - 1:
            raise ValueError(f"batch must be from 1 to 2**31 - 1, not {batch}")
        if isinstance(max_delay, bool) or not isinstance(max_delay, (int, float)):
            raise TypeError(f"max_delay must be a number of seconds, not {type(max_delay).__name__}")
        if not (math.isfinite(max_delay) and 0 < max_delay <= _MAX_DELAY_LIMIT):
            raise ValueError(
                f"max_delay must be a number of seconds above 0 and at most {_MAX_DELAY_LIMIT:g}, "
                f"not {max_delay!r}"
            )
        remover = os.environ.get("DISKPAGES_REMOVER", "auto")
        if remover not in native.REMOVERS:
            raise ValueError(f"DISKPAGES_REMOVER must be one of {sorted(native.REMOVERS)}, not {remover!r}")

        root_path = _folders.resolve_root(root)
        # Every fd here is in a box whose C finalizer closes it, and the folder is made,
        # locked and owned by the C cache in one call: an exception at any bytecode of this
        # constructor (a signal handler's) leaves no fd, no folder and no thread.
        root_box = _folders.open_root(root_path, create=True)  # refuses an unsafe root
        try:
            _folders.sweep_at(root_box[0], root_path)  # folders that killed processes left
            handle, name = native.cache_create(
                root_box[0],
                native.SYNC_MODES[sync],
                batch,
                max(1, round(max_delay * 1e9)),
                native.REMOVERS[remover],
                max_bytes or 0,
                pack_max,
                str(root_path),
            )
        finally:
            native.drop_now(root_box)
        path = str(root_path / name)

        self._path = Path(path)
        self._handle = handle  # the C cache's hold: its finalizer closes the cache too
        self._sync = sync
        self._batch = batch
        self._max_delay = float(max_delay)
        self._closed = False
        self._write_method = native.WRITE_METHODS["pwrite"]  # measured faster; see README
        self._close_lock = threading.RLock()
        self._closing = False  # close() runs in this thread (see close())
        self._pid = os.getpid()
        self._max_bytes = max_bytes
        self._pack_max = pack_max
        self._collect_when_full = collect_when_full
        self._handed = itertools.count(1)  # numbers hand_over()'s names: each is used once
        self._page_class = _WatchedPage if warn_on_gc else Page
        self._watched: weakref.WeakSet[Page] | None = weakref.WeakSet() if warn_on_gc else None
        self._finalizer = weakref.finalize(self, _shutdown_quietly, handle, path, self._watched)
        _caches.add(self)
        # A multiprocessing child (fork or forkserver) leaves through os._exit, which skips
        # atexit; multiprocessing runs its own finalizers first, so register there too.
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:
            mp_util.Finalize(self, self._finalizer, exitpriority=0)

    # -- properties -------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """This cache's own folder; every page file lives directly in it."""
        return self._path

    @property
    def closed(self) -> bool:
        """True after close(), and after the finalizer closed the cache (at exit, or when it
        was collected: a resurrected cache stays closed)."""
        return self._closed or not self._finalizer.alive

    @property
    def sync(self) -> str:
        return self._sync

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def max_delay(self) -> float:
        return self._max_delay

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def pack_max(self) -> int:
        """Pages of at most this many bytes are packed into segment files (0: none are)."""
        return self._pack_max

    # -- writing ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise CacheClosedError(f"the cache at {self._path} is closed")

    def write(self, data: Any) -> Page:
        """Write one page. When this returns the bytes are in a file under ``self.path``
        (and on stable storage as far as ``sync`` asks). On failure no file is left."""
        page = self._page_class._empty(self)  # owns what C hands over, whatever comes next
        args = (self._handle, data, self._write_method, self._path, page._hold)
        try:
            page._id, page._nbytes = native.write(*args)
        except CacheFullError:
            page._id, page._nbytes = self._make_room(native.write, args, [native.size_of(data)])
        except CacheClosedError:
            self._check_open()  # C says closed (or a forked child's): name the folder
            raise
        return page

    def write_many(self, buffers: Iterable[Any]) -> list[Page]:
        """Write many pages in one call into C, all or nothing: if any write fails, no
        page of this call is kept. Under ``sync="full"`` the folder is fsynced once."""
        self._check_open()
        items = list(buffers)
        empty = self._page_class._empty
        pages = [empty(self) for _ in items]
        args = (self._handle, items, self._write_method, str(self._path), [p._hold for p in pages])
        try:
            made = native.write_many(*args)
        except CacheFullError:
            made = self._make_room(native.write_many, args, list(map(native.size_of, items)))
        for page, (page_id, nbytes) in zip(pages, made, strict=True):
            page._id, page._nbytes = page_id, nbytes
        return pages

    def write_parts(self, parts: Iterable[Any]) -> Page:
        """Write one page whose bytes are ``parts`` (bytes-like objects) laid end to end,
        with pwritev: never joined in memory (a serializer's frames, a header and its
        body). Packed like write() if the total is at most ``pack_max``; otherwise as
        write(): checked against ``max_bytes``, all or nothing."""
        if isinstance(parts, (bytes, bytearray, memoryview, str)):
            raise TypeError(
                f"parts must be an iterable of bytes-like objects, not one {type(parts).__name__} "
                "(write() writes one buffer)"
            )
        self._check_open()
        items = list(parts)
        page = self._page_class._empty(self)
        args = (self._handle, items, str(self._path), page._hold, True)
        try:
            page._id, page._nbytes = native.write_parts(*args)
        except CacheFullError:
            requested = [sum(map(native.size_of, items))]
            page._id, page._nbytes = self._make_room(native.write_parts, args, requested)
        except CacheClosedError:
            self._check_open()
            raise
        return page

    def adopt(self, page: Page | BorrowedPage) -> Page:
        """A page of this cache with the bytes of ``page``, a page of another cache: most
        often a BorrowedPage, unpickled from a process that wrote it. The new page is this
        cache's own, so its owner may then release its page or exit. A page with a file of
        its own is adopted zero-copy, by a hard link to the file, where both caches are on
        one file system, and copied otherwise; a packed page is copied (its slot is reused
        in place once its owner lets go). PageLostError if the page is gone already;
        otherwise as write()."""
        if not isinstance(page, (Page, BorrowedPage)):
            raise TypeError(f"adopt() takes a Page or a BorrowedPage, not {type(page).__name__}")
        self._check_open()
        if page.packed:
            return self.write(page.read())  # read() checks the slot's tag: this page's bytes
        handed = str(page._path) if isinstance(page, BorrowedPage) and page._handed else None
        if isinstance(page, BorrowedPage):
            box = page._open()
            owner, fd = box, box[0]
        else:
            pin, fd, _ = page._pin()
            owner = pin[1]
        try:
            new = self._page_class._empty(self)
            new._nbytes = page.nbytes
            args = (self._handle, fd, page.nbytes, handed, str(self._path), new._hold)
            try:
                new._id, _ = native.adopt(*args)
            except CacheFullError:
                new._id, _ = self._make_room(native.adopt, args, [page.nbytes], pack=False)
            except OSError as e:
                if e.errno == native.ESIZE:
                    raise PageLostError(f"{page!r} changed size: it is not the page any more") from None
                raise
        finally:
            native.drop_now(owner)  # the fd: closed now, not when a traceback lets go
        return new

    def allocate(self, nbytes: int) -> PageBuilder:
        """A page of ``nbytes`` to fill in place through a writable shared mapping; its
        blocks are allocated now, so filling it cannot run out of space."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        self._check_open()
        builder = PageBuilder._empty(self)  # owns the page and its fd once C hands them over
        args = (self._handle, nbytes, str(self._path), builder._hold)
        try:
            page_id, fd = native.allocate(*args)
        except CacheFullError:
            page_id, fd = self._make_room(native.allocate, args, [nbytes], pack=False)
        # An error from here on drops the page and closes its fd at once (the builder's
        # finalizer would too, but only once a kept traceback lets go of it).
        try:
            builder._building(page_id, nbytes, _map_shared(fd, nbytes))
        except BaseException:
            builder._discard()
            raise
        return builder

    def write_array(self, array: Any) -> Page:
        """Write a NumPy array (or anything ``numpy.asarray`` takes) as a ``.npy`` page:
        numpy's header, then the data, so ``numpy.load(page.path, mmap_mode="r")`` and
        ``page.array()`` open it. C- and Fortran-ordered arrays are written from their own
        memory, others in C order, in pieces of at most 16 MiB (never copied whole into
        memory). Arrays holding Python objects raise TypeError: no pickle is ever written.
        Otherwise as ``write()``. Needs NumPy."""
        self._check_open()
        array = _arrays.as_array(array)
        if _arrays.is_strided(array):
            return _arrays.write_strided(self, array)
        header, data = _arrays.npy_parts(array)
        page = self._page_class._empty(self)
        args = (self._handle, (header, data), str(self._path), page._hold, False)
        try:
            page._id, page._nbytes = native.write_parts(*args)
        except CacheFullError:
            requested = [len(header) + data.nbytes]
            page._id, page._nbytes = self._make_room(native.write_parts, args, requested, pack=False)
        return page

    def allocate_array(self, shape: int | Iterable[int], dtype: Any) -> PageBuilder:
        """A ``.npy`` page to fill in place: the header is written, ``builder.array()`` is
        a writable C-ordered array of zeros over the page's mapping, and ``seal()`` works
        as for ``allocate()``. Object dtypes raise TypeError. Needs NumPy."""
        return _arrays.allocate_array(self, shape, dtype)

    def _make_room(self, write: Any, args: tuple[Any, ...], sizes: list[int], pack: bool = True) -> Any:
        """A write met the budget: remove the released pages and retry; then run the cycle
        collector (pages in unreachable cycles still hold their bytes), remove again and
        retry, as long as that frees something. Other threads may take the room a
        collection frees, or make new garbage meanwhile: so it goes on until two
        collections in a row change nothing (no page written, released or removed by
        anyone: the bytes are held by reachable pages) or COLLECT_WAIT seconds have passed
        in all, and only then raises CacheFullError, having written nothing. Each
        collection is run by this thread (see _collect_here). A write larger than
        max_bytes on its own raises at once: no removal or collection could make room. With
        collect_when_full=False it raises at once too, and leaves the removal to the reaper.
        ``sizes``: the bytes of each page the write makes (``pack``: small ones are packed),
        for what they take on disk, which is what max_bytes counts."""
        requested = sum(sizes)
        charge = sum(native.charge_for(self._handle, n, pack) for n in sizes)
        on_disk = f"{requested} bytes ({charge} on disk: whole slots, or 4 KiB blocks)"
        if self._max_bytes is not None and charge > self._max_bytes:
            what = "this page alone is"
            if len(sizes) != 1:  # all or nothing: charged as one
                what = f"these {len(sizes)} pages together are"
            raise CacheFullError(
                f"writing {on_disk} to the cache at {self._path}: {what} larger than "
                f"max_bytes={self._max_bytes}, so no removal or collection can make room; "
                "nothing was written"
            )
        if not self._collect_when_full:
            native.kick(self._handle)  # the reaper removes what was released, off this thread
            raise CacheFullError(
                f"writing {on_disk} would take the cache at {self._path} past max_bytes="
                f"{self._max_bytes}; nothing was written (collect_when_full=False: released "
                "pages are removed by the reaper, and no collection runs in this thread)"
            )
        deadline = time.monotonic() + COLLECT_WAIT
        self.remove_released()
        try:
            return write(*args)
        except CacheFullError:
            pass
        unchanged = 0
        while unchanged < 2 and time.monotonic() < deadline:
            before = self._progress()
            _collect_here(deadline)  # pages in unreachable cycles hold their bytes until this
            self.remove_released()
            try:
                return write(*args)
            except CacheFullError:
                pass
            unchanged = unchanged + 1 if self._progress() == before else 0
        s = self.stats()
        stuck = s.charged_bytes - s.live_disk_bytes - s.pending_disk_bytes
        held = ""
        if s.pinned_bytes:
            held += f", {s.pinned_bytes} held by views of {s.pinned} removed page(s)"
            stuck -= s.pinned_bytes
        if stuck > 0 and s.remove_errors:
            held += f", {stuck} in files that could not be removed (or writes under way)"
        raise CacheFullError(
            f"writing {on_disk} would take the cache at {self._path} past max_bytes="
            f"{self._max_bytes}: {s.live_disk_bytes} bytes on disk are live ({s.live_pages} "
            f"pages of {s.live_bytes} bytes) and {s.pending_disk_bytes} pending{held} even after "
            "remove_released() and a full collection; nothing was written"
        ) from None

    def _progress(self) -> tuple[int, int, int]:
        """What changes when anyone writes, releases or removes a page of this cache."""
        s = self.stats()
        return s.written, s.released, s.removed

    # -- removal ----------------------------------------------------------------------

    def remove_released(self) -> int:
        """Remove every released page's file now, in this thread; returns how many this
        call removed (the reaper may have removed others meanwhile). A removal that fails
        counts in ``stats().remove_errors``, and its bytes stay charged until close."""
        return native.flush(self._handle)  # 0 once closed

    def flush(self) -> int:
        """Deprecated alias of ``remove_released()``, kept for one release."""
        warnings.warn(
            "PageCache.flush() is deprecated: call remove_released(), which does the same",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.remove_released()

    def collect(self) -> int:
        """Run the cycle collector, so pages kept alive only by unreachable cycles are
        released, then ``remove_released()``. Returns how many pages of this cache the
        collection released (``stats().released_by_gc`` before and after; a collection
        another thread runs meanwhile may add its own), whether their files went in this
        call or in the reaper, which the collection wakes."""
        before = self.stats().released_by_gc
        _collect_here(time.monotonic() + COLLECT_WAIT)
        self.remove_released()
        return self.stats().released_by_gc - before

    def live(self) -> Iterator[LivePage]:
        """The pages of this cache that are alive (not released), oldest id first, with
        their size and age. Walks the heap through the gc module: a diagnostic."""
        return _explain.live_pages(self)

    def explain(self, page: Page) -> str:
        """What keeps ``page`` alive: every chain of references from a module's global or a
        local variable of the calling thread down to it (shortest first), how many
        references it cannot see (another thread's variables, C code: it never reads or
        changes another thread's frames), or that it is only in an unreachable reference
        cycle. A diagnostic: it walks the heap when called."""
        if not isinstance(page, Page) or getattr(page, "_cache", None) is not self:
            raise ValueError(f"{page!r} is not a page of this cache")
        return _explain.explain(page, skip_frames=1)

    def stats(self) -> CacheStats:
        raw: dict[str, Any] = native.cache_stats(self._handle)  # remover: its name, below
        raw["remover"] = native.REMOVER_NAMES.get(raw["remover"], str(raw["remover"]))
        return CacheStats(**raw)

    def close(self) -> None:
        """Remove every page file (live ones too) and the cache's folder, and close its file
        descriptors. Pages of a closed cache raise PageReleasedError; a view already taken
        stays readable. Idempotent and safe from several threads; if a file cannot be
        removed it raises OSError and a later close() tries again. Called again from a
        finalizer that runs inside close() (a collection it triggered), it returns at once:
        the outer call finishes the work."""
        if os.getpid() != self._pid:
            # A forked child borrows its parent's cache: it removes nothing, and must not
            # wait on a lock that a thread of the parent may have held at fork time.
            self._closed = True
            native.cache_close(self._handle, str(self._path))
            return
        with self._close_lock:  # a second caller waits until the folder is really gone
            if self._closing:
                return  # re-entered in this thread, from a finalizer: see above
            try:  # set inside the try: an interrupt anywhere leaves it reset
                self._closing = True
                info = self._finalizer.peek()
                if info is None:
                    return
                self._closed = True
                handle, path, _ = info[2]
                _shutdown(handle, path)  # on failure the finalizer stays: close() can be retried
                self._finalizer.detach()
            finally:
                self._closing = False

    def __enter__(self) -> PageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"sync={self._sync!r}"
        return f"<PageCache {str(self._path)!r} {state}>"


def _map_shared(fd: int, nbytes: int) -> mmap.mmap | None:
    """A builder's writable shared mapping of its (still nameless) file. A plain mmap.mmap,
    which keeps a dup of the fd while the builder or a view of it lives, so that mmap's
    resize() stays safe (it grows the file)."""
    return mmap.mmap(fd, nbytes, access=mmap.ACCESS_WRITE) if nbytes else None


# Mappings at least this long start at a multiple of it, as the kernel places a file
# mapping of its own: then a read can fault the file in as 2 MiB folios, not 4 KiB pages.
_HUGE = 2 * 1024 * 1024


def _map_read_only(fd: int, nbytes: int, path: Path) -> memoryview:
    """A read-only view of a shared mapping of fd, held by an mmap.mmap object, so Python's
    read-only and export rules apply, but without the fd that mmap.mmap(fd, ...) keeps open
    for its whole life: we map a private read-only anonymous placeholder through mmap.mmap
    (which costs no memory commit) and put the file's pages over it in C (MAP_FIXED). For a
    large page the placeholder is 2 MiB longer, and the file goes at its first 2 MiB
    boundary. The mapping goes when the last view of it dies."""
    if nbytes == 0:
        return memoryview(b"")  # mmap cannot map zero bytes; an empty page needs no mapping
    mapping = _placeholder(nbytes)
    skip = native.map_fixed(fd, mapping, nbytes, str(path), align=_HUGE if nbytes >= _HUGE else 1)
    return _view_of(mapping, skip, nbytes)


# Pages up to this size are read in one C call (into a bytearray, then copied once more);
# bigger ones by os.pread into the bytes object itself, through a pin.
_READ_IN_ONE_CALL = 1 << 20
# The names hand_over() gives the bytes it hands over, in the cache's folder: "<id>-<n>.handed"
_HANDED = ".handed"


class _PinnedMapping(mmap.mmap):
    """A placeholder mapping that holds a pin (dp_page_pin): the page's bytes, file or slot,
    are not freed or reused, and stay charged, until the last view of the mapping dies, or
    the mapping is closed (close(), a with block). A fork copies a view of a slot from its
    address (pack.c), so the pin forgets the address before the mapping goes; and the
    mapping cannot move (resize)."""

    __slots__ = ("_pin",)

    def close(self) -> None:
        pin = getattr(self, "_pin", None)
        if pin is not None:
            native.pin_forget(pin[1])
        try:
            super().close()  # BufferError while a view is exported: the mapping stays
        except BaseException:
            if pin is not None:
                native.pin_remember(pin[1])
            raise
        if pin is not None:
            native.drop_now(pin[1])  # nothing maps the bytes any more: let them go

    def __exit__(self, *exc: object) -> None:
        self.close()  # mmap's own __exit__ would close without the pin knowing

    def resize(self, newsize: int) -> None:
        raise ValueError("the mapping of a page's view cannot be resized")


def _placeholder(nbytes: int, cls: type[mmap.mmap] = mmap.mmap) -> Any:
    slack = _HUGE if nbytes >= _HUGE else 0
    return cls(-1, nbytes + slack, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


def _view_of(mapping: mmap.mmap, skip: int, nbytes: int) -> memoryview:
    whole = memoryview(mapping)
    view = whole[skip : skip + nbytes]
    whole.release()  # the slice holds the mapping's export on its own
    return view


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    # the modification time, not the change time, which a hard link changes (hand_over, adopt)
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _pread_exactly(fd: int, nbytes: int, offset: int, what: str) -> bytes:
    parts, done = [], 0
    while done < nbytes:  # one pread, unless over 2 GiB
        part = os.pread(fd, nbytes - done, offset + done)
        if not part:
            raise PageLostError(f"{what} changed size")
        parts.append(part)
        done += len(part)
    return b"".join(parts)  # a single part comes back as it is, not copied


class _Sized:
    __slots__ = ()
    _id: int
    _nbytes: int

    @property
    def id(self) -> int:
        return self._id

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return self._nbytes


class _Readable(_Sized):
    """What an owned Page and a BorrowedPage share: read(), view(), array(), with blocks."""

    __slots__ = ()

    def read(self) -> bytes:
        raise NotImplementedError

    def view(self) -> memoryview:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # with page: ... gives the page up at the end of the block

    def array(self) -> numpy.ndarray:
        """The ``.npy`` page as a NumPy array, zero-copy: read-only, over the same kind of
        mapping as ``view()``, so it holds no file descriptor and stays valid after the
        page is released. ValueError if the page is not a ``.npy`` file. Needs NumPy."""
        return _arrays.array_of(self)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> numpy.ndarray:
        """``numpy.asarray(page)`` is ``page.array()``: read-only and zero-copy (a writable
        copy with ``copy=True`` or another ``dtype``; ValueError for that with
        ``copy=False``), and ValueError for a page that is not a ``.npy`` file."""
        return _arrays.as_numpy(self.array(), dtype, copy, self._id)

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: object) -> Any:
        return self


class _PageFile(_Sized):
    """What a Page and a PageBuilder share: the hold on the C record that owns one page
    file. Made only by the cache (``_empty``), before the C call that fills the hold, so
    nothing between that call and the caller can orphan the record: whatever happens, the
    hold's finalizer lets go of it when this object goes."""

    # _hold: a 'dp_hold *' with a C finalizer (ffi.gc), used in every call; _memory: the
    # hold's memory, kept here too because it must outlive that finalizer, which can run
    # before this object dies (resurrection, gc.garbage): the hold is empty then.
    __slots__ = ("_cache", "_hold", "_memory", "_id", "_nbytes")
    _cache: PageCache
    _hold: native.Hold
    _memory: native.Memory

    def __new__(cls, *args: object, **kwargs: object) -> _PageFile:
        raise TypeError("pages come from PageCache.write(), write_many() and allocate()")

    @classmethod
    def _empty(cls, cache: PageCache) -> Self:
        self = object.__new__(cls)
        self._memory, self._hold = native.new_hold()
        self._id = self._nbytes = 0  # until C fills the hold
        self._cache = cache
        return self

    @property
    def path(self) -> Path:
        return self._cache._path / native.page_name(self._id)


class Page(_PageFile, _Readable):
    """A page on disk. Its file is removed soon after the last reference to this object
    goes (or at ``release()``, or when the cache closes). Immutable; copying returns it.
    Pickling gives a BorrowedPage in the process that loads it."""

    __slots__ = ("__weakref__",)

    _release = native.page_release
    _released = native.page_released
    borrowed = False

    @property
    def cache(self) -> PageCache:
        return self._cache

    @property
    def released(self) -> bool:
        """True once ``release()`` ran, the cache closed, or the collector reclaimed this
        page (an object can outlive that: resurrection, gc.garbage); its file is then gone
        or going."""
        return bool(self._released(self._hold))

    def release(self) -> None:
        """Give the page up now: reads fail from here on and the file goes with the next
        batch (or ``cache.remove_released()``). Idempotent; safe from any thread."""
        self._release(self._hold)

    @property
    def packed(self) -> bool:
        """True if the page is a slot in a segment file shared with other pages (see
        ``PageCache``'s ``pack_max``), False if it has a file of its own (or is released)."""
        return native.page_slot(self._hold) is not None

    @property
    def path(self) -> Path:
        """The page's own file, for a page that has one: ``numpy.load(page.path)`` and other
        tools may open it. A packed page has none (ValueError): its bytes are a slot in a
        file other pages share, and reused once it is gone; use ``read()``, ``view()``,
        ``array()``, or pickle it."""
        if self.packed:
            raise ValueError(
                f"page {self._id} is packed: its {self._nbytes} bytes are a slot in a segment file "
                "that other pages share, so it has no file of its own; use read(), view() or "
                "array(), or write it with pack_max=0 (or write_array) for a file"
            )
        return super().path

    def _where(self) -> str:
        """The page's file, or its slot: for messages."""
        slot = native.page_slot(self._hold)
        if slot is None:
            return str(super().path)
        segment = self._cache._path / native.segment_name(slot[0])
        return f"slot {slot[1]} of {segment}"

    def _written_at(self) -> float | None:
        """When the page's bytes were written (seconds since the epoch), or None if they
        are not on disk (released, lost)."""
        slot = native.page_slot(self._hold)
        try:
            if slot is None:
                return os.stat(super().path).st_mtime
            fd = os.open(self._cache._path / native.segment_name(slot[0]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                page_id, _, written_ns = native.read_tag(fd, slot[1])
            finally:
                os.close(fd)
        except OSError:
            return None
        return written_ns / 1e9 if page_id == self._id else None

    def _pin(self) -> tuple[Any, int, int]:
        """Pin the page's bytes: (pin, fd, offset). The pin (a hold whose finalizer is C)
        keeps them from being freed or reused, even after release, until it is dropped;
        the fd is the pin's, valid until then."""
        memory, pin = native.new_hold(native.pin_drop)  # owns what C hands over
        fd, offset = native.page_pin(self._hold, pin)
        if fd >= 0:
            return (memory, pin), fd, offset
        raise self._error(fd)

    def _error(self, code: int) -> Exception:
        if code == -native.ERELEASED:
            return PageReleasedError(f"page {self._id} was released")
        if code in (-native.ENOENT, -native.ESIZE):
            why = "is gone" if code == -native.ENOENT else "changed size"
            return PageLostError(f"page {self._id}: {self._where()} {why}")
        return native.error(code, self._where())

    def read(self) -> bytes:
        """A copy of the page's bytes."""
        if self._nbytes <= _READ_IN_ONE_CALL:
            got = native.page_read(self._hold, self._nbytes)
            if isinstance(got, bytes):
                return got
            raise self._error(got)
        pin, fd, offset = self._pin()
        try:
            return _pread_exactly(fd, self._nbytes, offset, f"page {self._id}")
        finally:
            native.drop_now(pin[1])  # closes the fd, and lets the bytes go if released

    def readinto(self, buffer: Any) -> int:
        """Copy the page's bytes into ``buffer``, a writable bytes-like object of at least
        ``nbytes`` bytes, in one call (no intermediate copy); returns ``nbytes``."""
        rc = native.page_read_into(self._hold, buffer, self._nbytes, f"page {self._id}")
        if rc:
            raise self._error(rc)
        return self._nbytes

    def view(self) -> memoryview:
        """The page's bytes, zero-copy: a read-only memoryview over a read-only shared
        mapping. It holds no file descriptor, and stays valid after the page is released
        and the cache closed: the page's bytes stay on disk, unchanged, until the last view
        of them dies, and count in ``stats()`` (``pinned_bytes``, once the page is released
        and removed) and against ``max_bytes`` meanwhile. For a page of 2 MiB or more,
        ``view.obj`` is longer than the page, which starts at its first 2 MiB boundary: use
        the view, not its ``obj``."""
        pin, fd, offset = self._pin()
        if self._nbytes == 0:
            native.drop_now(pin[1])
            return memoryview(b"")  # mmap cannot map zero bytes
        try:
            mapping = _placeholder(self._nbytes, _PinnedMapping)
            mapping._pin = pin  # the mapping holds the bytes from here, and the view with it
            align = _HUGE if self._nbytes >= _HUGE else 1
            skip = native.pin_map(pin[1], mapping, self._nbytes, self._where(), align=align)
        except BaseException as e:
            native.drop_now(pin[1])  # the bytes go now, not with a traceback
            if isinstance(e, OSError) and e.errno in (native.ENOENT, native.ESIZE):
                # a forked child whose parent reused the slot, or a segment cut short
                raise self._error(-cast(int, e.errno)) from None
            raise
        return _view_of(mapping, skip, self._nbytes)

    def __reduce__(self) -> Any:
        # The handle names the file (or the segment and slot) and pins its identity: a
        # file's device, inode and modification time (an inode number alone is reused at once),
        # so a borrower does not read another file that later took the name; a slot's tag
        # (its page's id, checked before and after each read), so a borrower does not read
        # another page that later took the slot. Only the path travels: no bytes.
        slot = native.page_slot(self._hold)
        pin, fd, _ = self._pin()
        try:
            st = os.fstat(fd)
        finally:
            native.drop_now(pin[1])
        native.page_share(self._hold, st.st_dev, st.st_ino)  # a borrower may map the file: see view()
        if slot is None:
            return BorrowedPage._load, (str(super().path), self._id, self._nbytes, _identity(st))
        segment = str(self._cache._path / native.segment_name(slot[0]))
        return BorrowedPage._load, (segment, self._id, self._nbytes, _identity(st)[:2], slot)

    def hand_over(self) -> BorrowedPage:
        """A handle for another process to make this page's bytes its own: pickle it, and
        ``cache.adopt()`` it there. The bytes get a file of their own in this cache's folder
        (a hard link to the page's file; for a packed page, a copy), which stays when this
        Page goes, until a receiver adopts it (it moves into the receiver's folder,
        zero-copy where both are on one file system) or this cache closes. So a pool worker
        may return ``page.hand_over()`` and drop the page: there is no race with its
        reaper. The handed bytes count against neither cache's ``max_bytes`` until
        adopted; this cache's ``stats()`` lists them (``handed``, ``handed_bytes``) until a
        receiver adopts them or this cache closes."""
        cache = self._cache
        name = f"{self._id}-{next(cache._handed)}{_HANDED}"
        identity = native.hand_over(self._hold, name)
        if isinstance(identity, int):
            if identity == -native.ECLOSED:
                cache._check_open()
            raise self._error(identity)
        return BorrowedPage._load(str(cache._path / name), self._id, self._nbytes, identity, None, True)

    def __repr__(self) -> str:
        state = " released" if self.released else ""
        return f"<Page {self._id} {self._nbytes} bytes{state}>"


class _WatchedPage(Page):
    """A Page of a ``warn_on_gc`` cache: it says so when the cycle collector, rather than
    refcount or release(), reclaims it (and the cache's finalizer says so for pages alive
    at exit), the way an unclosed file does."""

    __slots__ = ()

    _reclaimed_by_gc = native.page_reclaimed_by_gc  # for __del__ at shutdown
    _warn: Callable[..., None] = warnings.warn  # a plain attribute: not bound to self

    @classmethod
    def _empty(cls, cache: PageCache) -> Self:
        self = super()._empty(cache)
        cache._watched.add(self)  # type: ignore[union-attr]
        return self

    def __del__(self) -> None:
        # The hold's finalizer may run before or after this one in a collection: C
        # remembers which pages the collector reclaimed. No source=self: whoever records
        # the warning would keep this object alive.
        if self._reclaimed_by_gc(self._hold):
            self._warn(
                f"page {self._id} ({self._nbytes} bytes) was reclaimed by the cycle collector, "
                "not by refcount or release(): it was in a reference cycle",
                ResourceWarning,
            )


class BorrowedPage(_Readable):
    """A page owned by another Page object, usually in another process: what unpickling a
    Page gives. It reads the same file, or the same slot of a segment file (zero-copy
    through ``view()`` for a file; a verified copy for a slot), but never removes it: its
    release, its death and its process's exit leave the page to the owner.

    The owner must outlive its readers: once the owner's page is released, reads raise
    PageLostError (a view taken before stays readable). A slot is checked against its tag
    before and after every read, so a borrower never gets another page's bytes: it gets
    the page's, or PageLostError."""

    __slots__ = ("_path", "_id", "_nbytes", "_identity", "_slot", "_given_up", "_handed", "__weakref__")
    _path: Path
    _identity: tuple[int, ...]
    _slot: tuple[int, int] | None
    _given_up: bool
    _handed: bool

    borrowed = True

    @classmethod
    def _load(
        cls,
        path: str,
        page_id: int,
        nbytes: int,
        identity: tuple[int, ...],
        slot: tuple[int, int] | None = None,
        handed: bool = False,
    ) -> BorrowedPage:
        self = object.__new__(cls)
        self._path = Path(path)
        self._id = page_id
        self._nbytes = nbytes
        self._identity = tuple(identity)
        self._slot = None if slot is None else (int(slot[0]), int(slot[1]))
        self._given_up = False
        self._handed = handed  # by Page.hand_over(): adopt() moves the file
        return self

    def __new__(cls, *args: object, **kwargs: object) -> BorrowedPage:
        raise TypeError("a BorrowedPage comes from unpickling a Page")

    @property
    def packed(self) -> bool:
        return self._slot is not None

    @property
    def path(self) -> Path:
        """The page's own file; ValueError for a packed page (see ``Page.path``)."""
        if self._slot is not None:
            raise ValueError(f"borrowed page {self._id} is packed: it has no file of its own")
        return self._path

    @property
    def released(self) -> bool:
        """True once this handle's ``release()`` ran; says nothing of the owner's page."""
        return self._given_up

    def release(self) -> None:
        """Stop reading through this handle. The page stays: it is the owner's."""
        self._given_up = True

    def _open(self) -> Any:
        """The file (or segment), checked to be the one the owner pickled: a box whose
        ``[0]`` is the fd, closed by its C finalizer (so an exception anywhere, even a
        signal handler's between two bytecodes, cannot orphan the fd), or at once by
        native.drop_now."""
        if self._given_up:
            raise PageReleasedError(f"borrowed page {self._id} was released")
        size = -1 if self._slot is not None else self._nbytes
        box = native.borrow_open(str(self._path), self._identity, size)
        if box is None:
            raise PageLostError(
                f"borrowed page {self._id}: {self._path} is gone or is not the page any more "
                "(its owner released it or exited)"
            )
        return box

    def _check_tag(self, fd: int) -> None:
        assert self._slot is not None
        if native.read_tag(fd, self._slot[1])[:2] != (self._id, self._nbytes):
            raise PageLostError(
                f"borrowed page {self._id}: its slot in {self._path} holds another page now "
                "(its owner released it)"
            )

    def read(self) -> bytes:
        box = self._open()
        try:
            fd = box[0]
            if self._slot is None:
                return _pread_exactly(fd, self._nbytes, 0, f"borrowed page {self._id}")
            size, slot = self._slot
            self._check_tag(fd)  # the page's before; still the page's after: the bytes are
            data = _pread_exactly(fd, self._nbytes, native.TAGS_BYTES + slot * size, "a segment")
            self._check_tag(fd)
            return data
        finally:
            native.drop_now(box)

    def readinto(self, buffer: Any) -> int:
        """Copy the page's bytes into ``buffer`` (as ``Page.readinto``); returns ``nbytes``."""
        native.writable_check(buffer, self._nbytes, f"borrowed page {self._id}")  # before reading
        native.copy_into(buffer, self.read(), f"borrowed page {self._id}")
        return self._nbytes

    def view(self) -> memoryview:
        """A read-only view of the page's bytes: zero-copy for a page with a file (as
        ``Page.view()``), a checked copy for a packed one, whose slot the owner may reuse.
        A zero-copy view counts in the owner's ``stats()`` (``pinned_bytes``, once the
        owner's page is released and removed) and against its ``max_bytes`` until the view
        and every view or array derived from it die, in whatever process the view is (a
        forked child's copy included), by an OFD lock that the view's mapping keeps: the
        owner looks for it when it removes the page's file. PageLostError if the owner
        removed the page already."""
        if self._slot is not None:
            return memoryview(self.read())
        box = self._open()
        try:
            # the view counts in the owner's stats() and max_bytes until it dies, even
            # after the owner released the page (csrc/diskpages.h, dp_borrow_view)
            if self._nbytes and not native.borrow_view(box[0], str(self._path)):
                raise PageLostError(
                    f"borrowed page {self._id}: {self._path} is gone (its owner released it or exited)"
                )
            return _map_read_only(box[0], self._nbytes, self._path)
        finally:
            native.drop_now(box)

    def __reduce__(self) -> Any:
        return BorrowedPage._load, (
            str(self._path),
            self._id,
            self._nbytes,
            self._identity,
            self._slot,
            self._handed,
        )

    def __repr__(self) -> str:
        state = " released" if self._given_up else ""
        where = f"slot {self._slot[1]} of " if self._slot is not None else ""
        return f"<BorrowedPage {self._id} {self._nbytes} bytes {where}{str(self._path)!r}{state}>"


class PageBuilder(_PageFile):
    """A page being written in place. ``view()`` is a writable memoryview over the file's
    shared mapping; ``seal()`` syncs per the cache's mode, gives the file its name, unmaps
    and returns the Page. Until then the file has no name in the folder, so a builder
    dropped unsealed, or a process killed while it fills one, leaves nothing. Its file
    descriptor belongs to the C record: it closes at seal(), or when the builder goes. As a
    context manager it is discarded at the end of the block unless sealed in it."""

    __slots__ = ("_mapping", "_lock", "_busy", "_sealed")
    _mapping: mmap.mmap | None
    _lock: threading.RLock
    _busy: bool
    _sealed: bool

    @classmethod
    def _empty(cls, cache: PageCache) -> Self:
        self = super()._empty(cache)
        self._sealed = False
        self._mapping = None
        self._lock = threading.RLock()
        self._busy = False
        return self

    def _building(self, page_id: int, nbytes: int, mapping: Any) -> None:
        self._id, self._nbytes, self._mapping = page_id, nbytes, mapping

    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        """One builder method at a time, with the builder's fd. A method called again from
        a finalizer that runs inside one (the same thread) raises RuntimeError instead of
        deadlocking or seeing the builder half changed; another thread waits."""
        with self._lock:
            if self._busy:
                raise RuntimeError(
                    f"page {self._id}: a builder method was called from a finalizer that ran "
                    "inside another of its methods"
                )
            if self._sealed:
                raise ValueError(f"page {self._id} is sealed; use the Page seal() returned")
            fd = native.builder_fd(self._hold)
            if fd < 0:  # discarded, or its finalizer ran (it may live on: resurrection)
                raise PageReleasedError(f"page {self._id} was discarded")
            self._busy = True
            try:
                yield fd
            finally:
                self._busy = False

    def _discard(self) -> None:
        """Give up an unsealed builder now rather than when it is collected (a traceback
        may hold it a long time): its fd closes and its record is dropped, so its file and
        its bytes in the budget go. The builder is unusable after."""
        with self._lock:
            self._mapping = None  # a view still holding the mapping keeps only the mapping
            native.page_drop(self._hold)

    def _write_at(self, data: Any, offset: int) -> int:
        """pwrite all of ``data`` at ``offset`` through the builder's fd; returns its length.
        ENOSPC and the like are OSError here, where a store into the mapping would be
        SIGBUS on a file without reserved blocks."""
        done = 0
        # released however this ends: no traceback keeps the caller's buffer exported
        with memoryview(data) as whole, whole.cast("B") as view, self._using() as fd:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        return done

    @property
    def sealed(self) -> bool:
        return self._sealed

    @property
    def path(self) -> Path:
        """Where the page's file will be once sealed (until then it has no name)."""
        return super().path

    def view(self) -> memoryview:
        """A writable view of the page's bytes (zero-filled at first)."""
        with self._using():
            if self._cache.closed:
                raise CacheClosedError(f"the cache at {self._cache._path} is closed")
            return memoryview(self._mapping if self._mapping is not None else bytearray())

    def array(self) -> numpy.ndarray:
        """A writable NumPy array over the page's mapping (a page from ``allocate_array()``,
        or any whose bytes start with a ``.npy`` header). Like a view, it makes ``seal()``
        raise BufferError while it is alive. Needs NumPy."""
        return _arrays.array_of(self)

    def seal(self) -> Page:
        """Sync the bytes per the cache's sync mode, unmap, give the file its name, and
        return the read-only Page. Raises BufferError while a view from ``view()`` is alive:
        a sealed page must never change through an old view. After any error the builder
        is as it was and ``seal()`` can be tried again."""
        with self._using() as fd:
            cache = self._cache
            cache._check_open()
            mapping = self._mapping
            if mapping is not None:
                if cache._sync != "none":
                    mapping.flush()  # msync(MS_SYNC): the bytes, before the name
                try:
                    mapping.close()  # BufferError while a view is exported
                except BufferError:
                    raise BufferError(
                        f"a view or array of page {self._id} is still alive (from the builder's "
                        "view() or array(), or a slice of one); drop it (del) before seal(), "
                        "since a sealed page must never change through it"
                    ) from None
            # The record moves into the new page's hold: from the moment C returns the page
            # owns it, so an interrupt after this line drops the page and orphans nothing.
            page = cache._page_class._empty(cache)
            try:
                native.seal(self._hold, page._hold, str(self.path))
            except BaseException:
                # Usable again, unless the seal went through and only the return was cut
                # short (an interrupt): then the new hold dropped the page, and the
                # builder's fd is closed, its record gone.
                if native.builder_fd(self._hold) >= 0:
                    self._mapping = _map_shared(fd, self._nbytes)
                raise
            page._id, page._nbytes = self._id, self._nbytes
            self._mapping = None
            self._sealed = True
            return page

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with cache.allocate(n) as builder:`` leaves nothing unless ``seal()`` ran in
        the block: left unsealed, normally or by an exception (which goes on), the builder
        is discarded at once, its fd closed, its file and its bytes in the budget gone."""
        if not self._sealed:
            self._discard()

    def __reduce__(self) -> Any:
        raise TypeError("a PageBuilder cannot be pickled: seal() it and pickle the Page")

    def __repr__(self) -> str:
        state = "sealed" if self._sealed else "open"
        return f"<PageBuilder {self._id} {self._nbytes} bytes {state}>"
