"""The binding: one small function per C function of csrc/diskpages.h.

Each calls its C function, then turns the result into a Python value or an exception. No
policy lives here; the public classes decide."""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

from ._native import ffi, lib
from .errors import CacheClosedError, CacheFullError, PageReleasedError

if lib.dp_native_init() != 0:  # the page type, built in C (csrc/pageobj.c)
    raise ImportError("diskpages._native could not build its page type (printed above)")
from ._native import PageBase as PageBase  # noqa: E402  (set by dp_native_init: the pages' base)

SYNC_MODES = {"none": lib.DP_SYNC_NONE, "data": lib.DP_SYNC_DATA, "full": lib.DP_SYNC_FULL}
REMOVERS = {"auto": lib.DP_REMOVE_AUTO, "loop": lib.DP_REMOVE_LOOP, "io_uring": lib.DP_REMOVE_URING}
REMOVER_NAMES = {lib.DP_REMOVE_LOOP: "loop", lib.DP_REMOVE_URING: "io_uring"}
WRITE_METHODS = {"pwrite": lib.DP_WRITE_PWRITE, "mmap": lib.DP_WRITE_MMAP}

# Plain references to the C functions that finalizers and the gc callback call, so that
# they still reach them at interpreter shutdown, when module globals are already None.
pin_drop = lib.dp_pin_drop
pin_forget = lib.dp_pin_forget
pin_remember = lib.dp_pin_remember
gc_phase = lib.dp_gc_phase
gc_collecting = lib.dp_gc_collecting
gc_collecting_here = lib.dp_gc_collecting_here
gc_take_releases = lib.dp_gc_take_releases
kick = lib.dp_kick

Hold = Any  # a cdata 'dp_hold *': a page's (hold_at), or one owned by a C finalizer (new_hold)
Memory = Any  # the cdata that owns a hold's memory (ffi.new)

_cast = ffi.cast


def hold_at(address: int) -> Hold:
    """The hold at ``address``, inside a page object (PageBase._address): valid only while
    that object is, so a caller passes it to a call it makes through the object."""
    return _cast("dp_hold *", address)


def address_of(hold: Hold) -> int:
    """A hold's address, for the page type's makers (PageBase._write and friends), which
    take the cache's hold by address: the caller keeps the hold alive meanwhile."""
    return int(_cast("uintptr_t", hold))


def new_hold(drop: Any, _new: Any = ffi.new, _gc: Any = ffi.gc) -> tuple[Memory, Hold]:
    """An empty hold (csrc/diskpages.h), already owned by its finalizer before any C call
    fills it. The finalizer is C (ffi.gc calls ``drop`` with no Python frame in between),
    so no exception can cut it short or come between the call and the owner: whatever C
    hands over is dropped when the hold's last reference goes. The memory comes back too:
    whoever keeps the hold keeps its memory, which must outlive the finalizer (it runs in
    a collection even when its object is then resurrected or kept in gc.garbage)."""
    memory = _new("dp_hold *")
    return memory, _gc(memory, drop)


def drop_now(hold: Hold) -> None:
    """Run a hold's finalizer now rather than when its last reference goes (ffi.release);
    nothing if it ran already."""
    try:
        ffi.release(hold)
    except ValueError:
        pass


def error(code: int, path: os.PathLike[str] | str | None = None) -> Exception:
    """The exception for a negative C result; returned, not raised, so callers ``raise`` it."""
    code = -code
    if code == lib.DP_ECLOSED:
        return CacheClosedError("the cache is closed")
    if code == lib.DP_ERELEASED:
        return PageReleasedError("the page was released")
    if code == lib.DP_EFULL:
        return CacheFullError("the write would take the cache past its max_bytes")
    if code == lib.DP_EFORKED:
        return CacheClosedError(
            "this cache belongs to the process that opened it; a forked child cannot add "
            "pages to it (open a PageCache of its own)"
        )
    return OSError(code, os.strerror(code), None if path is None else os.fspath(path))


def page_name(page_id: int) -> str:
    """The file name of a page, from C (dp_page_name), which names the files."""
    buf = ffi.new("char[32]")
    lib.dp_page_name(page_id, buf)
    name: bytes = ffi.string(buf)  # a char[] comes back as bytes
    return name.decode()


def cache_create(
    root_fd: int,
    sync: int,
    batch: int,
    max_delay_ns: int,
    remover: int,
    max_bytes: int,
    pack_max: int,
    root: str,
) -> tuple[Hold, str]:
    """A new cache in a folder of its own under the root open at root_fd, made, locked and
    opened in one C call (dp_cache_create): (its hold, the folder's name). The hold's
    finalizer closes the cache and removes the folder, so from the moment C returns no
    exception can orphan either. (The PageCache's weakref.finalize keeps the hold until it
    has run, at exit at the latest.)"""
    memory, hold = new_hold(lib.dp_cache_drop)  # ffi.gc keeps memory until it has run
    name = ffi.new("char[32]")
    try:
        rc = lib.dp_cache_create(root_fd, sync, batch, max_delay_ns, remover, max_bytes, pack_max, hold, name)
        if rc:
            raise error(rc, root)
        folder: bytes = ffi.string(name)
        return hold, folder.decode()
    except BaseException:
        # made, and an interrupt came before it was handed back: closed now, not when a
        # kept traceback lets go of this frame (nothing, if it was not made)
        lib.dp_cache_close(hold)
        raise


def open_at(path: str, dir_fd: int | None = None, directory: bool = True) -> Any:
    """An fd box (``box[0]`` is the fd) of ``path`` (relative to dir_fd if given), opened
    read-only, never following a symlink; a directory unless ``directory`` is False. Its
    finalizer closes the fd, so no exception can orphan it (native.drop_now closes it at
    once). OSError naming path if it cannot."""
    box = ffi.gc(ffi.new("int *", -1), lib.dp_fd_box_close)
    rc = lib.dp_open_at(AT_FDCWD if dir_fd is None else dir_fd, os.fsencode(path), directory, box)
    if rc:
        raise error(rc, path)
    return box


AT_FDCWD = -100


def cache_close(cache: Hold, path: str) -> bool:
    """Empty the cache's folder, remove it, and close its fds; False (and nothing removed)
    in a forked child, where the folder is the parent's."""
    rc = lib.dp_cache_close(cache)
    if rc == -lib.DP_EFORKED:
        return False
    if rc:
        raise error(rc, path)
    return True


def cache_stats(cache: Hold) -> dict[str, int]:
    out = ffi.new("dp_stats *")
    lib.dp_cache_stats(cache, out)
    return {name: getattr(out, name) for name, _ in ffi.typeof("dp_stats").fields}


def as_buffer(data: Any, writable: bool = False) -> Any:
    """A cdata over any C-contiguous bytes-like object (``writable``: and writable);
    TypeError for anything else. It holds an export of ``data`` until released: every
    caller releases it before it returns or raises (``with``, or _release in a
    ``finally``), so no traceback, frame or reference cycle keeps the caller's buffer
    exported (CPython 3.12 before 3.12.7 could crash clearing such a cycle: gh-77894)."""
    try:
        return ffi.from_buffer(data, require_writable=writable)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(data).__name__!r}") from None
    except ValueError as e:  # a released memoryview, say
        raise ValueError(f"the {type(data).__name__} cannot be read: {e}") from None
    except BufferError:
        if writable and memoryview(data).readonly:
            what = type(data).__name__
            raise TypeError(f"readinto() needs a writable buffer, not a read-only {what}") from None
        raise BufferError(f"the {type(data).__name__} is not C-contiguous") from None


# Releases the exports of as_buffer()'s cdatas: called inline in a finally, as
# deque(map(_release, bufs), 0), which runs no bytecode, so no interrupt (a signal
# handler's exception, checked for on entry to a Python function) can come before or
# between the releases.
_release = ffi.release


def charge_for(cache: Hold, nbytes: int, pack: bool) -> int:
    """What a page of nbytes takes on disk in this cache, and is charged (dp_charge_for)."""
    return int(lib.dp_charge_for(cache, nbytes, pack))


def size_of(data: Any) -> int:
    """The byte size of a bytes-like object, its export released at once."""
    with as_buffer(data) as buf:
        return len(buf)


def writable(target: Any, nbytes: int, what: str) -> Any:
    """A cdata over the caller's writable, C-contiguous buffer, checked to take nbytes;
    the caller releases it (``with``)."""
    buf = as_buffer(target, writable=True)
    if len(buf) < nbytes:
        ffi.release(buf)
        raise ValueError(f"the buffer holds {len(buf)} bytes; {what} has {nbytes}")
    return buf


# Each write fills holds that the caller's new objects already own; it returns the ids.


def write(
    page_class: Any,
    cache: Any,
    address: int,
    data: Any,
    method: int,
    watch: bool,
    path: os.PathLike[str] | str,
) -> Any:
    """A new page of ``page_class`` (PageBase._write): the object is made, the buffer
    exported, the bytes written and the export released in one C call."""
    try:
        page = page_class._write(cache, address, data, method, watch)
    except (TypeError, ValueError, BufferError):
        size_of(data)  # raises what a caller should see for a bad buffer
        raise
    if isinstance(page, int):
        raise error(page, path)
    return page


def write_many(
    page_class: Any, cache: Any, address: int, buffers: list[Any], method: int, watch: bool, path: str
) -> list[Any]:
    """New pages, all or nothing, in one C call (PageBase._write_many): every buffer is
    checked before any page is written, and every export released before it returns."""
    try:
        made: list[Any] | tuple[int, int] = page_class._write_many(cache, address, buffers, method, watch)
    except (TypeError, ValueError, BufferError):
        deque(map(size_of, buffers), 0)  # raises what a caller should see for a bad buffer
        raise
    if isinstance(made, tuple):
        rc, failed_at = made
        exc = error(rc, path)
        if failed_at < len(buffers):
            exc.add_note(f"writing buffer {failed_at} of {len(buffers)}; no page of this call was kept")
        raise exc
    return made


def write_parts(cache: Hold, parts: Sequence[Any], path: str, page: Hold, pack: bool) -> tuple[int, int]:
    """One page whose bytes are the parts laid end to end, written without joining them: a
    slot if ``pack`` and it is small enough, else a file with its blocks reserved first."""
    bufs: list[Any] = []
    try:
        # each appended as it is made, so the finally releases every one made, even when a
        # later one raises; every check happens before any file is made
        bufs += map(as_buffer, parts)
        sizes_list = [len(b) for b in bufs]
        data = ffi.new("void *[]", bufs) if bufs else ffi.NULL
        sizes = ffi.new("size_t[]", sizes_list) if bufs else ffi.NULL
        page_id = ffi.new("uint64_t *")
        rc = lib.dp_write_parts(cache, data, sizes, len(bufs), pack, page, page_id)
    finally:
        deque(map(_release, bufs), 0)  # no bytecode, so no interrupt, before the releases
    if rc:
        raise error(rc, path)
    return page_id[0], sum(sizes_list)


def adopt(cache: Hold, fd: int, nbytes: int, handed: str | None, path: str, page: Hold) -> tuple[int, bool]:
    """A page of this cache from another's page file open at fd: (id, linked), linked False
    where its bytes were copied; then the path ``handed``, unless None, is unlinked."""
    page_id = ffi.new("uint64_t *")
    rc = lib.dp_adopt(cache, fd, nbytes, ffi.NULL if handed is None else os.fsencode(handed), page, page_id)
    if rc < 0:
        raise error(rc, path)
    return page_id[0], rc == 1


def allocate(cache: Hold, nbytes: int, path: str, builder: Hold) -> tuple[int, int]:
    """A builder's page: (id, fd); the fd is the record's, valid until the page is sealed
    or the hold lets go (see builder_fd)."""
    page_id = ffi.new("uint64_t *")
    fd = lib.dp_allocate(cache, nbytes, builder, page_id)
    if fd < 0:
        raise error(fd, path)
    return page_id[0], fd


def builder_fd(builder: Hold) -> int:
    """The fd of a builder's page, or -ERELEASED once it was sealed or let go."""
    return int(lib.dp_builder_fd(builder))


def seal(builder: Hold, page: Hold, path: str) -> None:
    """Seal a builder's page; its record moves into ``page``."""
    rc = lib.dp_seal(builder, page)
    if rc:
        raise error(rc, path)


def empty_folder(dirfd: int, path: str) -> int:
    """Remove every entry of the folder open at dirfd; how many went."""
    n = lib.dp_empty_folder(dirfd)
    if n < 0:
        raise error(n, path)
    return int(n)


def page_pin(page: Hold, pin: Hold) -> tuple[int, int]:
    """Pin the page's bytes into ``pin`` (a hold from new_hold(pin_drop)): (fd, offset),
    the fd the pin's own, valid until the pin is dropped or mapped; or (negative C error,
    0) for the caller to interpret (DP_ERELEASED: released, let go of, or its cache closed;
    -ENOENT or DP_ESIZE: the file is not the page's)."""
    offset = ffi.new("uint64_t *")
    fd = lib.dp_page_pin(page, pin, offset)
    return int(fd), int(offset[0])


def page_read(page: Hold, nbytes: int) -> bytes | int:
    """The page's bytes, read in one C call under a pin; or a negative C error, as
    page_pin. For pages small enough to read through a bytearray (one copy more)."""
    buf = bytearray(nbytes)
    with ffi.from_buffer(buf) as addr:
        rc = lib.dp_page_read(page, addr, nbytes)
    return bytes(buf) if rc == 0 else int(rc)


def hand_over(page: Hold, name: str) -> tuple[int, int, int] | int:
    """(device, inode, modification time) of the file named ``name`` that the page's bytes
    now have in its cache's folder (dp_hand_over); or a negative C error, as page_pin."""
    identity = ffi.new("int64_t[3]")
    rc = lib.dp_hand_over(page, os.fsencode(name), identity)
    return (identity[0], identity[1], identity[2]) if rc == 0 else int(rc)


def page_read_into(page: Hold, target: Any, nbytes: int, what: str) -> int:
    """Read the whole page into the first nbytes of target, a writable buffer (checked as
    writable() does), in one C call under a pin: 0, or a negative C error, as page_pin."""
    with writable(target, nbytes, what) as buf:
        return int(lib.dp_page_read(page, buf, nbytes))


def writable_check(target: Any, nbytes: int, what: str) -> None:
    """Raise what writable() raises for target, keeping no export."""
    with writable(target, nbytes, what):
        pass


def copy_into(target: Any, data: bytes, what: str) -> None:
    """Copy data into the start of target, a writable buffer (checked as writable() does)."""
    with writable(target, len(data), what) as buf:
        ffi.memmove(buf, data, len(data))


def pin_map(pin: Hold, target: Any, nbytes: int, path: str, align: int = 1) -> int:
    """As map_fixed, for pinned bytes (and the pin's fd is closed after)."""
    return _map_into(target, align, path, lambda at: lib.dp_pin_map(pin, at, nbytes))


def page_slot(page: Hold) -> tuple[int, int] | None:
    """(slot size, slot) of a packed page; None for a page with a file of its own (or one
    whose hold is empty)."""
    size, slot = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.dp_page_slot(page, size, slot) == 1:
        return int(size[0]), int(slot[0])
    return None


def borrow_open(path: str, identity: Sequence[int], size: int) -> Any:
    """An fd box (``box[0]`` is the fd) for a borrower's file or segment, if it is still
    the one pickled (identity: device, inode and, for a file, modification time; size: -1 for a
    segment); its finalizer closes the fd, so no exception can orphan it. None if it is
    gone or another file took its name; OSError for anything else."""
    box = ffi.gc(ffi.new("int *", -1), lib.dp_fd_box_close)
    mtime = identity[2] if len(identity) > 2 else -1
    rc = lib.dp_borrow_open(os.fsencode(path), identity[0], identity[1], mtime, size, box)
    if rc == -_errno.ENOENT:
        return None
    if rc:
        raise error(rc, path)
    return box


def borrow_view(fd: int, path: str) -> bool | None:
    """Lock a borrower's file open at fd for mapping (dp_borrow_view): True, or None where
    the lock lives only as long as fd (overlayfs), so the view's mapping must keep fd open;
    False if its name is gone or is another file (the owner removed the page); OSError for
    anything else."""
    rc = lib.dp_borrow_view(fd, os.fsencode(path))
    if rc == -_errno.ENOENT:
        return False
    if rc < 0:
        raise error(rc, path)
    return None if rc == 1 else True


page_share = lib.dp_page_share


def read_tag(fd: int, slot: int) -> tuple[int, int, int]:
    """(page id, nbytes, written_ns) from the tag of `slot` in the segment open at fd
    (csrc/diskpages.h, dp_tag); all 0 past the tags written so far."""
    raw = os.pread(fd, TAG_BYTES, slot * TAG_BYTES)
    if len(raw) < TAG_BYTES:
        return 0, 0, 0
    page_id, nbytes, written_ns, _ = struct.unpack("<QQQQ", raw)
    return page_id, nbytes, written_ns


def segment_name(slot_size: int) -> str:
    buf = ffi.new("char[32]")
    lib.dp_segment_name(slot_size, buf)
    name: bytes = ffi.string(buf)
    return name.decode()


TAGS_BYTES = lib.DP_TAGS_BYTES
TAG_BYTES = ffi.sizeof("dp_tag")
PACK_LIMIT = lib.DP_PACK_LIMIT


def map_fixed(fd: int, target: Any, nbytes: int, path: str, align: int = 1) -> int:
    """Replace `nbytes` of the pages of `target` (an anonymous mmap.mmap) with a read-only
    shared mapping of fd, starting at the first address in it that is a multiple of
    `align`; return that start's offset into `target`."""
    return _map_into(target, align, path, lambda at: lib.dp_map_fixed(fd, at, nbytes))


def _map_into(target: Any, align: int, path: str, map_at: Any) -> int:
    """Map at the first address in target that is a multiple of align (map_at(address)
    returns 0 or a negative C error); that address's offset into target."""
    with ffi.from_buffer(target) as addr:
        skip = -int(ffi.cast("uintptr_t", addr)) % align
        rc = map_at(addr + skip)
    if rc:
        raise error(rc, path)
    return skip


def flush(cache: Hold) -> int:
    return int(lib.dp_flush(cache))


ENOENT = _errno.ENOENT
ESIZE = lib.DP_ESIZE
ERELEASED = lib.DP_ERELEASED
ECLOSED = lib.DP_ECLOSED
