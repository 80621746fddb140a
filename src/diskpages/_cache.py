"""PageCache, Page and PageBuilder: the public API and every lifetime rule.

A Page owns one record in C. When the last reference to the Page goes, ``Page.__del__``
hands the record to the C release queue (one CAS, no system call, no lock); the cache's
reaper thread removes the files in batches. See README.md, "Lifetimes", for why
``__del__`` rather than ``weakref.finalize``.
"""

from __future__ import annotations

import gc
import math
import mmap
import os
import tempfile
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _arrays
from . import _bindings as native
from .errors import CacheClosedError, PageLostError, PageReleasedError

if TYPE_CHECKING:
    import numpy

__all__ = ["PageCache", "Page", "PageBuilder", "CacheStats", "default_root"]

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_MAX_DELAY_LIMIT = 1e9  # seconds (31 years): keeps the C side's nanoseconds in range


def default_root() -> Path:
    """``$DISKPAGES_ROOT``, else ``<tempdir>/diskpages-<uid>``: one root per user."""
    env = os.environ.get("DISKPAGES_ROOT")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"diskpages-{os.getuid()}"


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a cache's counters (each read atomically, not all at one instant)."""

    live_pages: int  #: written and not released
    live_bytes: int
    pending: int  #: released, file not yet removed
    pending_bytes: int
    removed: int  #: files removed since the cache opened
    remove_errors: int  #: removals that failed (the file stays until close)
    written: int  #: pages written since the cache opened
    remover: str  #: "io_uring" or "loop": how this cache removes files


def _shutdown(handle: Any, path: str) -> None:
    """Close a cache: every file and the folder go. The finalizer of PageCache, so it must
    not reference the cache object, and it runs at exit through weakref.finalize's atexit
    hook, before module globals are torn down."""
    if not native.cache_close(handle, path):
        return  # a forked child borrows its parent's cache; it removes nothing
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass  # removed under us: what close wants anyway


def _shutdown_quietly(handle: Any, path: str) -> None:
    try:
        _shutdown(handle, path)
    except OSError:
        pass  # nothing to report to at exit or in a collection; close() raises instead


class PageCache:
    """Pages on disk whose files live exactly as long as their Page objects.

    ``root`` is the folder under which this cache makes its own private folder
    (``self.path``, mode 0700). ``sync`` says what is on stable storage when a write
    returns: ``"none"`` (nothing forced), ``"data"`` (the page's bytes), ``"full"`` (the bytes
    and the page's name in the folder). Released pages are removed by a C thread once
    ``batch`` are waiting or ``max_delay`` seconds have passed, or at once by ``flush()``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        sync: str = "none",
        batch: int = 64,
        max_delay: float = 0.05,
    ) -> None:
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

        # absolute, so that a later os.chdir() cannot move page paths or close()'s rmdir
        root_path = (Path(root) if root is not None else default_root()).absolute()
        os.makedirs(root_path, mode=0o700, exist_ok=True)  # OSError names the path
        path = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root_path)
        try:
            dirfd = os.open(path, _OPEN_DIR)
            try:
                handle = native.cache_open(
                    dirfd,
                    native.SYNC_MODES[sync],
                    batch,
                    max(1, round(max_delay * 1e9)),
                    native.REMOVERS[remover],
                    path,
                )
            except BaseException:
                os.close(dirfd)
                raise
        except BaseException:
            os.rmdir(path)
            raise

        self._path = Path(path)
        self._handle = handle
        self._sync = sync
        self._batch = batch
        self._max_delay = float(max_delay)
        self._closed = False
        self._write_method = native.WRITE_METHODS["pwrite"]  # measured faster; see README
        self._close_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown_quietly, handle, path)

    # -- properties -------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """This cache's own folder; every page file lives directly in it."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def sync(self) -> str:
        return self._sync

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def max_delay(self) -> float:
        return self._max_delay

    # -- writing ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError(f"the cache at {self._path} is closed")

    def write(self, data: Any) -> Page:
        """Write one page. When this returns the bytes are in a file under ``self.path``
        (and on stable storage as far as ``sync`` asks). On failure no file is left."""
        self._check_open()
        rec, page_id, nbytes = native.write(self._handle, data, self._write_method, str(self._path))
        return Page._new(self, rec, page_id, nbytes)

    def write_many(self, buffers: Iterable[Any]) -> list[Page]:
        """Write many pages in one call into C, all or nothing: if any write fails, no
        page of this call is kept. Under ``sync="full"`` the folder is fsynced once."""
        self._check_open()
        items = list(buffers)
        made = native.write_many(self._handle, items, self._write_method, str(self._path))
        return [Page._new(self, rec, page_id, nbytes) for rec, page_id, nbytes in made]

    def allocate(self, nbytes: int) -> PageBuilder:
        """A page of ``nbytes`` to fill in place through a writable shared mapping; its
        blocks are allocated now, so filling it cannot run out of space."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        self._check_open()
        rec, page_id, fd = native.allocate(self._handle, nbytes, str(self._path))
        try:
            # A plain shared mapping of the file: it keeps a dup of the fd while the builder
            # (or a view of it) lives, and so mmap's resize() stays safe (it grows the file).
            mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_WRITE) if nbytes else None
        except BaseException:
            native.page_drop(rec)
            raise
        finally:
            os.close(fd)
        return PageBuilder._building(self, rec, page_id, nbytes, mapping)

    def write_array(self, array: Any) -> Page:
        """Write a NumPy array (or anything ``numpy.asarray`` takes) as a ``.npy`` page:
        numpy's header, then the data, so ``numpy.load(page.path, mmap_mode="r")`` and
        ``page.array()`` open it. C- and Fortran-ordered arrays are written from their own
        memory, others in C order. Arrays holding Python objects raise TypeError: no pickle
        is ever written. Otherwise as ``write()``. Needs NumPy."""
        self._check_open()
        header, data = _arrays.npy_parts(array)
        rec, page_id, nbytes = native.write_parts(self._handle, (header, data), str(self._path))
        return Page._new(self, rec, page_id, nbytes)

    def allocate_array(self, shape: int | Iterable[int], dtype: Any) -> PageBuilder:
        """A ``.npy`` page to fill in place: the header is written, ``builder.array()`` is
        a writable C-ordered array of zeros over the page's mapping, and ``seal()`` works
        as for ``allocate()``. Object dtypes raise TypeError. Needs NumPy."""
        return _arrays.allocate_array(self, shape, dtype)

    # -- removal ----------------------------------------------------------------------

    def flush(self) -> int:
        """Remove every released page's file now, in this thread; returns how many this
        call removed (the reaper may have removed others meanwhile)."""
        if self._closed:
            return 0
        return native.flush(self._handle)

    def collect(self) -> int:
        """Run the cycle collector, so pages kept alive only by unreachable cycles are
        released, then ``flush()``."""
        gc.collect()
        return self.flush()

    def stats(self) -> CacheStats:
        raw = native.cache_stats(self._handle)
        raw["remover"] = native.REMOVER_NAMES.get(raw["remover"], str(raw["remover"]))
        return CacheStats(**raw)

    def close(self) -> None:
        """Remove every page file (live ones too) and the cache's folder. Pages of a closed
        cache raise PageReleasedError; a view already taken stays readable. Idempotent and
        safe from several threads; if a file cannot be removed it raises OSError and a
        later close() tries again."""
        with self._close_lock:  # a second caller waits until the folder is really gone
            info = self._finalizer.peek()
            if info is None:
                return
            self._closed = True
            _shutdown(*info[2])  # on failure the finalizer stays: close() can be retried
            self._finalizer.detach()

    def __enter__(self) -> PageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"sync={self._sync!r}"
        return f"<PageCache {str(self._path)!r} {state}>"


def _map_read_only(fd: int, nbytes: int, path: Path) -> mmap.mmap | None:
    """A read-only shared mapping of fd, held by an mmap.mmap object, so Python's read-only
    and export rules apply, but without the fd that mmap.mmap(fd, ...) keeps open for its
    whole life: we map a private read-only anonymous placeholder through mmap.mmap (which
    costs no memory commit) and put the file's pages over it in C (MAP_FIXED). The
    mapping goes when the object dies."""
    if nbytes == 0:
        return None  # mmap cannot map zero bytes; an empty page needs no mapping
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    native.map_fixed(fd, mapping, nbytes, str(path))
    return mapping


class _PageFile:
    """What a Page and a PageBuilder share: the C record that owns one page file.
    Made only by the cache (``_new``), never half-constructed, so ``__del__`` always finds
    its record."""

    __slots__ = ("_cache", "_rec", "_id", "_nbytes")

    # Captured at class creation, so __del__ needs no module global at shutdown.
    _drop = native.page_drop

    def __new__(cls, *args: object, **kwargs: object) -> _PageFile:
        raise TypeError("pages come from PageCache.write(), write_many() and allocate()")

    @classmethod
    def _new(cls, cache: PageCache, rec: Any, page_id: int, nbytes: int) -> Any:
        self = object.__new__(cls)
        self._rec = rec
        self._cache = cache
        self._id = page_id
        self._nbytes = nbytes
        return self

    @property
    def id(self) -> int:
        return self._id

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return self._nbytes

    @property
    def path(self) -> Path:
        return self._cache._path / native.page_name(self._id)


class Page(_PageFile):
    """A page on disk. Its file is removed soon after the last reference to this object
    goes (or at ``release()``, or when the cache closes). Immutable; copying returns it."""

    __slots__ = ("__weakref__",)

    _release = native.release
    _released = native.released

    def __del__(self) -> None:
        # Runs when the last reference goes (refcount) or when the cycle collector frees
        # the page's cycle. Just an enqueue in C: safe in any thread, in a collection and at
        # shutdown. A second release is a no-op in C.
        self._drop(self._rec)

    @property
    def cache(self) -> PageCache:
        return self._cache

    @property
    def released(self) -> bool:
        """True once ``release()`` ran or the cache closed; the file is then gone or going."""
        return self._cache._closed or bool(self._released(self._rec))

    def release(self) -> None:
        """Give the page up now: reads fail from here on and the file goes with the next
        batch (or ``cache.flush()``). Idempotent; safe from any thread."""
        self._release(self._rec)

    def _open(self) -> int:
        cache = self._cache
        if self.released:
            raise PageReleasedError(f"page {self._id} was released")
        fd = native.open_page(cache._handle, self._id, self._nbytes)
        if fd >= 0:
            return fd
        if self.released:  # released or closed while we looked
            raise PageReleasedError(f"page {self._id} was released")
        if fd in (-native.ENOENT, -native.ESIZE):
            why = "is gone" if fd == -native.ENOENT else "changed size"
            raise PageLostError(f"page {self._id}: its file {self.path} {why}")
        raise native.error(fd, self.path)

    def read(self) -> bytes:
        """A copy of the page's bytes."""
        fd = self._open()
        try:
            parts, done = [], 0
            while done < self._nbytes:  # one pread, unless over 2 GiB
                part = os.pread(fd, self._nbytes - done, done)
                if not part:
                    raise PageLostError(f"page {self._id}: its file {self.path} changed size")
                parts.append(part)
                done += len(part)
            return b"".join(parts)  # a single part comes back as it is, not copied
        finally:
            os.close(fd)

    def view(self) -> memoryview:
        """The page's bytes, zero-copy: a read-only memoryview over a read-only shared
        mapping. It holds no file descriptor, and stays valid after the page is released
        and the cache closed (a mapping outlives its file's name)."""
        fd = self._open()
        try:
            mapping = _map_read_only(fd, self._nbytes, self.path)
        finally:
            os.close(fd)
        return memoryview(mapping if mapping is not None else b"")

    def array(self) -> numpy.ndarray:
        """The ``.npy`` page as a NumPy array, zero-copy: read-only, over the same kind of
        mapping as ``view()``, so it holds no file descriptor and stays valid after the
        page is released. ValueError if the page is not a ``.npy`` file. Needs NumPy."""
        return _arrays.array_of(self)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __copy__(self) -> Page:
        return self

    def __deepcopy__(self, memo: object) -> Page:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("a Page cannot be pickled (yet): it owns its file")

    def __repr__(self) -> str:
        state = " released" if self.released else ""
        return f"<Page {self._id} {self._nbytes} bytes{state}>"


class PageBuilder(_PageFile):
    """A page being written in place. ``view()`` is a writable memoryview over the file's
    shared mapping; ``seal()`` syncs per the cache's mode, unmaps and returns the Page.
    Dropped unsealed, it leaves no file."""

    __slots__ = ("_mapping", "_lock", "_sealed")

    @classmethod
    def _building(cls, cache: PageCache, rec: Any, page_id: int, nbytes: int, mapping: Any) -> PageBuilder:
        self = cls._new(cache, rec, page_id, nbytes)
        self._sealed = False
        self._mapping = mapping
        self._lock = threading.Lock()
        return self

    def __del__(self) -> None:
        if not self._sealed:
            self._drop(self._rec)  # the mapping, if a view still holds it, dies with the view

    @property
    def sealed(self) -> bool:
        return self._sealed

    def view(self) -> memoryview:
        """A writable view of the page's bytes (zero-filled at first)."""
        with self._lock:
            if self._sealed:
                raise ValueError(f"page {self._id} is sealed; use the Page seal() returned")
            if self._cache._closed:
                raise CacheClosedError(f"the cache at {self._cache._path} is closed")
            return memoryview(self._mapping if self._mapping is not None else bytearray())

    def array(self) -> numpy.ndarray:
        """A writable NumPy array over the page's mapping (a page from ``allocate_array()``,
        or any whose bytes start with a ``.npy`` header). Like a view, it makes ``seal()``
        raise BufferError while it is alive. Needs NumPy."""
        return _arrays.array_of(self)

    def seal(self) -> Page:
        """Sync the bytes per the cache's sync mode, unmap, and return the read-only Page.
        Raises BufferError while a view from ``view()`` is alive: a sealed page must never
        change through an old view. The builder stays usable after that error."""
        with self._lock:
            if self._sealed:
                raise ValueError(f"page {self._id} is already sealed")
            cache = self._cache
            cache._check_open()
            mapping = self._mapping
            # Everything that can fail comes before the unmap, so a failure leaves the
            # builder as it was: bytes first, then the folder (the name), then unmap.
            if mapping is not None and cache._sync != "none":
                mapping.flush()  # msync(MS_SYNC)
            native.seal(cache._handle, str(cache._path))  # folder fsync; refuses in a fork
            if mapping is not None:
                mapping.close()  # BufferError while a view is exported
            self._mapping = None
            self._sealed = True
            return Page._new(cache, self._rec, self._id, self._nbytes)

    def __repr__(self) -> str:
        state = "sealed" if self._sealed else "open"
        return f"<PageBuilder {self._id} {self._nbytes} bytes {state}>"
