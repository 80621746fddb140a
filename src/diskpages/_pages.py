"""The page classes: Page, BorrowedPage or PageBuilder, each with its lifetime rules.

Ownership is by reference. A Page (or PageBuilder) is one Python object whose storage
(PageBase, csrc/pageobj.c) holds its hold on the C record (csrc/hold.c), made before or
inside the C call that fills it. When the Page's last reference goes or the collector
finds it unreachable, C drops the hold: one CAS onto the C release queue, no system call,
no lock, and no Python frame, so no KeyboardInterrupt can cut it short. The cache's
reaper thread removes the files in batches. A record holds its C cache; the cache lives
until its PageCache and its last record are gone. A Page whose hold the collector dropped
(it may live on: resurrection, gc.garbage) finds its hold empty and raises
PageReleasedError. See README.md, "Lifetimes".
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

from . import _arrays
from . import _bindings as native
from ._bindings import PageBase
from ._views import HUGE, PinnedMapping, map_read_only, map_shared, placeholder, view_of
from .errors import CacheClosedError, PageLostError, PageReleasedError

if TYPE_CHECKING:
    import numpy


class PageOwner(Protocol):
    """The cache as its pages see it (PageCache is the one there is): the page classes sit
    below the cache, so they name what they use of it rather than import it."""

    @property
    def path(self) -> Path: ...
    @property
    def closed(self) -> bool: ...
    @property
    def sync(self) -> str: ...
    @property
    def _path(self) -> Path: ...
    @property
    def _sync(self) -> str: ...
    @property
    def _handed(self) -> Iterator[int]: ...
    @property
    def _watch(self) -> bool: ...
    @property
    def _watched(self) -> weakref.WeakSet[Page] | None: ...
    def _check_open(self) -> None: ...


# Pages up to this size are read in one C call (into a bytearray, then copied once more);
# bigger ones by os.pread into the bytes object itself, through a pin.
_READ_IN_ONE_CALL = 1 << 20
# The names hand_over() gives the bytes it hands over, in the cache's folder: "<id>-<n>.handed"
_HANDED = ".handed"


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


class _PageFile(PageBase, _Sized):
    """What a Page and a PageBuilder share: one Python object whose storage (PageBase,
    csrc/pageobj.c) holds the hold on the C record that owns the page's bytes, its cache,
    its id and its size. Made only by the cache (``_write``, ``_write_many``, or ``_empty``
    before the C call that fills the hold), so nothing between that call and the caller
    can orphan the record: its death (refcount, or the collector's finalizer) drops the
    hold in C, with no Python frame in between."""

    __slots__ = ()
    _cache: PageOwner

    def __new__(cls, *args: object, **kwargs: object) -> _PageFile:
        raise TypeError("pages come from PageCache.write(), write_many() and allocate()")

    @classmethod
    def _empty(cls, cache: PageOwner) -> Self:
        """One whose hold is still empty, for a C call through cffi to fill."""
        self: Self = cls._new(cache, False)
        return self

    @property
    def _hold(self) -> native.Hold:
        # a 'dp_hold *' into this object's own storage: valid while this object is, so
        # only ever passed to a call made through it
        return native.hold_at(self._address)

    @property
    def path(self) -> Path:
        return self._cache._path / native.page_name(self._id)


class Page(_PageFile, _Readable):
    """A page on disk. Its file is removed soon after the last reference to this object
    goes (or at ``release()``, or when the cache closes). Immutable; copying returns it.
    Pickling gives a BorrowedPage in the process that loads it."""

    __slots__ = ("__weakref__",)

    borrowed = False

    @classmethod
    def _empty(cls, cache: PageOwner) -> Self:
        self: Self = cls._new(cache, cache._watch)
        if cache._watched is not None:
            cache._watched.add(self)  # for the warning if the cache's finalizer reclaims it
        return self

    @property
    def cache(self) -> PageOwner:
        return self._cache

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
            mapping = placeholder(self._nbytes, PinnedMapping)
            mapping._pin = pin  # the mapping holds the bytes from here, and the view with it
            align = HUGE if self._nbytes >= HUGE else 1
            skip = native.pin_map(pin[1], mapping, self._nbytes, self._where(), align=align)
        except BaseException as e:
            native.drop_now(pin[1])  # the bytes go now, not with a traceback
            if isinstance(e, OSError) and e.errno in (native.ENOENT, native.ESIZE):
                # a forked child whose parent reused the slot, or a segment cut short
                raise self._error(-cast(int, e.errno)) from None
            raise
        return view_of(mapping, skip, self._nbytes)

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
        owner looks for it (in /proc/locks) when it removes the page's file. On overlayfs the
        view keeps the fd it locked with. Not counted: where /proc is not mounted, and on a
        file system whose stat() device differs from the one /proc/locks names (btrfs
        subvolumes). PageLostError if the owner removed the page already."""
        if self._slot is not None:
            return memoryview(self.read())
        box = self._open()
        keep = None
        try:
            # the view counts in the owner's stats() and max_bytes until it dies, even
            # after the owner released the page (csrc/diskpages.h, dp_borrow_view)
            locked = native.borrow_view(box[0], str(self._path)) if self._nbytes else True
            if locked is False:
                raise PageLostError(
                    f"borrowed page {self._id}: {self._path} is gone (its owner released it or exited)"
                )
            keep = box if locked is None else None  # overlayfs: the lock goes with the fd
            return map_read_only(box[0], self._nbytes, self._path, keep)
        finally:
            if keep is None:
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
    def _empty(cls, cache: PageOwner) -> Self:
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
            self._drop()

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
            page = Page._empty(cache)
            try:
                native.seal(self._hold, page._hold, str(self.path))
            except BaseException:
                # Usable again, unless the seal went through and only the return was cut
                # short (an interrupt): then the new hold dropped the page, and the
                # builder's fd is closed, its record gone.
                if native.builder_fd(self._hold) >= 0:
                    self._mapping = map_shared(fd, self._nbytes)
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
