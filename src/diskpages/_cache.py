"""PageCache: the cache a user opens, the one door to writing pages.

It checks its arguments, owns the C cache (a hold whose finalizer closes it), and makes
the pages: the page classes (_pages.py) hold the records it hands out, the budget's retry
(_budget.py) makes room when a write meets ``max_bytes``, and the finalizer (_finalize.py)
closes the cache when it is collected or at exit. See README.md, "How it works".
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import _arrays, _budget, _explain, _folders
from . import _bindings as native
from ._explain import LivePage
from ._finalize import shutdown as _shutdown
from ._finalize import shutdown_quietly as _shutdown_quietly
from ._pages import BorrowedPage, Page, PageBuilder
from ._stats import CacheStats
from ._views import map_shared
from .errors import CacheClosedError, CacheFullError, PageLostError

__all__ = ["PageCache", "Page", "BorrowedPage", "PageBuilder", "CacheStats"]

_write_page = Page._write  # bound once: write()'s one C call (PageBase._write)
_MAX_DELAY_LIMIT = 1e9  # seconds (31 years): keeps the C side's nanoseconds in range

#: The default ``pack_max``: pages up to this many bytes are slots in segment files (see
#: README.md, "Packed pages", for the measurements behind it).
PACK_MAX = 256 * 1024


def _default_pack_max() -> int:
    raw = os.environ.get("DISKPAGES_PACK_MAX")
    if raw is None:
        return PACK_MAX
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"DISKPAGES_PACK_MAX must be a number of bytes, not {raw!r}") from None


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
        handle = None
        try:
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
            self._address = native.address_of(handle)  # for the page type's makers
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
            self._watch = warn_on_gc
            self._watched: weakref.WeakSet[Page] | None = weakref.WeakSet() if warn_on_gc else None
            self._finalizer = weakref.finalize(self, _shutdown_quietly, handle, path, self._watched)
            _budget.watch(self)
            # A multiprocessing child (fork or forkserver) leaves through os._exit, which
            # skips atexit; multiprocessing runs its own finalizers first, so register there.
            mp_util = sys.modules.get("multiprocessing.util")
            if mp_util is not None:
                mp_util.Finalize(self, self._finalizer, exitpriority=0)
        except BaseException:
            # Made, and an interrupt (or an error) came after: the cache closes now (its
            # files, folder, fds and reaper), not when a kept traceback lets go of this
            # frame. Its hold stays valid: a finalizer made already finds it closed.
            if handle is not None:
                with contextlib.suppress(OSError):
                    native.cache_close(handle, str(root_path))
            raise

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
        # one C call makes the page and fills its hold: nothing comes between them
        try:
            page = _write_page(self, self._address, data, self._write_method, self._watch)
        except (TypeError, ValueError, BufferError):
            native.size_of(data)  # raises what a caller should see for a bad buffer
            raise
        if isinstance(page, int):  # a C error
            page = self._write_failed(page, data)
        if self._watched is not None:
            self._watched.add(page)  # for the warning if the cache's finalizer reclaims it
        return page

    def _write_failed(self, rc: int, data: Any) -> Page:
        """write() met C error ``rc``: over budget, make room and retry; else raise it."""
        exc = native.error(rc, self._path)
        if isinstance(exc, CacheFullError):
            args = (Page, self, self._address, data, self._write_method, self._watch, self._path)
            page: Page = self._make_room(native.write, args, [native.size_of(data)])
            return page
        if isinstance(exc, CacheClosedError):
            self._check_open()  # C says closed (or a forked child's): name the folder
        raise exc

    def write_many(self, buffers: Iterable[Any]) -> list[Page]:
        """Write many pages in one call into C, all or nothing: if any write fails, no
        page of this call is kept. Under ``sync="full"`` the folder is fsynced once."""
        self._check_open()
        items = list(buffers)
        args = (Page, self, self._address, items, self._write_method, self._watch, str(self._path))
        try:
            pages: list[Page] = native.write_many(*args)
        except CacheFullError:
            pages = self._make_room(native.write_many, args, list(map(native.size_of, items)))
        if self._watched is not None:
            self._watched.update(pages)
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
        page = Page._empty(self)
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
            new = Page._empty(self)
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
            builder._building(page_id, nbytes, map_shared(fd, nbytes))
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
        page = Page._empty(self)
        args = (self._handle, (header, data), str(self._path), page._hold, False)
        try:
            page._id, page._nbytes = native.write_parts(*args)
        except CacheFullError:
            requested = [len(header) + native.size_of(data)]
            page._id, page._nbytes = self._make_room(native.write_parts, args, requested, pack=False)
        return page

    def allocate_array(self, shape: int | Iterable[int], dtype: Any) -> PageBuilder:
        """A ``.npy`` page to fill in place: the header is written, ``builder.array()`` is
        a writable C-ordered array of zeros over the page's mapping, and ``seal()`` works
        as for ``allocate()``. Object dtypes raise TypeError. Needs NumPy."""
        return _arrays.allocate_array(self, shape, dtype)

    def _make_room(self, write: Any, args: tuple[Any, ...], sizes: list[int], pack: bool = True) -> Any:
        """A write met the budget: make room and retry (see _budget.make_room)."""
        return _budget.make_room(self, write, args, sizes, pack)

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
        return _budget.collect(self)

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
