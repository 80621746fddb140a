"""One small function per C function of csrc/diskpages.h: call it, turn the result into a
Python value or an exception. No policy lives here; the public classes decide."""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence
from typing import Any

from ._native import ffi, lib
from .errors import CacheClosedError, CacheFullError, PageReleasedError

SYNC_MODES = {"none": lib.DP_SYNC_NONE, "data": lib.DP_SYNC_DATA, "full": lib.DP_SYNC_FULL}
REMOVERS = {"auto": lib.DP_REMOVE_AUTO, "loop": lib.DP_REMOVE_LOOP}
REMOVER_NAMES = {lib.DP_REMOVE_LOOP: "loop", lib.DP_REMOVE_URING: "io_uring"}
WRITE_METHODS = {"pwrite": lib.DP_WRITE_PWRITE, "mmap": lib.DP_WRITE_MMAP}

# Plain references to the C functions that finalizers and the gc callback call, so that
# they still reach them at interpreter shutdown, when module globals are already None.
page_release = lib.dp_page_release
page_drop = lib.dp_page_drop
page_released = lib.dp_page_released
page_reclaimed_by_gc = lib.dp_page_reclaimed_by_gc
gc_phase = lib.dp_gc_phase
gc_collecting = lib.dp_gc_collecting
gc_collecting_here = lib.dp_gc_collecting_here
gc_take_releases = lib.dp_gc_take_releases
kick = lib.dp_kick

Hold = Any  # a cdata 'dp_hold *' whose finalizer lets go of what C put in it (ffi.gc)
Memory = Any  # the cdata that owns a hold's memory (ffi.new), kept beside it


def _hold(drop: Any) -> tuple[Memory, Hold]:
    """An empty hold, already owned by its finalizer (``drop``) before any C call fills it:
    an exception at any bytecode after the call (KeyboardInterrupt, or one raised by a
    signal handler) drops what C handed over, instead of orphaning it. The memory is
    returned too, and whoever keeps the hold keeps it: the finalizer may run before the
    object that keeps the hold dies (resurrection, gc.garbage), and the memory must stay.
    (The finalizer keeps the memory alive until it has run: ffi.gc keeps its cdata.)"""
    memory = ffi.new("dp_hold *")
    return memory, ffi.gc(memory, drop)


def page_hold() -> tuple[Memory, Hold]:
    return _hold(lib.dp_page_drop)


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
    return ffi.string(buf).decode()


def cache_open(
    dirfd: int, sync: int, batch: int, max_delay_ns: int, remover: int, max_bytes: int, path: str
) -> tuple[Memory, Hold]:
    memory, hold = _hold(lib.dp_cache_drop)
    rc = lib.dp_cache_open(dirfd, sync, batch, max_delay_ns, remover, max_bytes, hold)
    if rc:
        raise error(rc, path)
    return memory, hold


def cache_close(cache: Hold, path: str) -> bool:
    """Empty the cache's folder and close its fds; False (and nothing removed) in a forked
    child, where the folder is the parent's."""
    rc = lib.dp_cache_close(cache)
    if rc == -lib.DP_EFORKED:
        return False
    if rc:
        raise error(rc, path)
    return True


def cache_closed(cache: Hold) -> bool:
    return bool(lib.dp_cache_closed(cache))


def cache_stats(cache: Hold) -> dict[str, int]:
    out = ffi.new("dp_stats *")
    lib.dp_cache_stats(cache, out)
    return {name: getattr(out, name) for name, _ in ffi.typeof("dp_stats").fields}


def as_buffer(data: Any) -> Any:
    """A cdata over any C-contiguous bytes-like object; TypeError for anything else."""
    try:
        return ffi.from_buffer(data)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(data).__name__!r}") from None
    except (ValueError, BufferError):
        raise BufferError(f"the {type(data).__name__} is not C-contiguous") from None


# Each write returns (memory, hold, id, nbytes) per page: see _hold.


def write(cache: Hold, data: Any, method: int, path: str) -> tuple[Memory, Hold, int, int]:
    buf = as_buffer(data)
    memory, hold = page_hold()
    page_id = ffi.new("uint64_t *")
    rc = lib.dp_write(cache, buf, len(buf), method, hold, page_id)
    if rc:
        raise error(rc, path)
    return memory, hold, page_id[0], len(buf)


def write_many(
    cache: Hold, buffers: Sequence[Any], method: int, path: str
) -> list[tuple[Memory, Hold, int, int]]:
    count = len(buffers)
    bufs = [as_buffer(b) for b in buffers]  # every check happens before any file is made
    data = ffi.new("void *[]", bufs) if count else ffi.NULL
    sizes = ffi.new("size_t[]", [len(b) for b in bufs]) if count else ffi.NULL
    made = [page_hold() for _ in range(count)]
    holds = ffi.new("dp_hold *[]", [hold for _, hold in made]) if count else ffi.NULL
    ids = ffi.new("uint64_t[]", max(count, 1))
    failed_at = ffi.new("size_t *")
    rc = lib.dp_write_many(cache, data, sizes, count, method, holds, ids, failed_at)
    if rc:
        exc = error(rc, path)
        if failed_at[0] < count:
            exc.add_note(f"writing buffer {failed_at[0]} of {count}; no page of this call was kept")
        raise exc
    return [(memory, hold, ids[i], len(bufs[i])) for i, (memory, hold) in enumerate(made)]


def write_parts(cache: Hold, parts: Sequence[Any], path: str) -> tuple[Memory, Hold, int, int]:
    """One page whose bytes are the parts laid end to end, written without joining them."""
    bufs = [as_buffer(p) for p in parts]
    count = len(bufs)
    data = ffi.new("void *[]", bufs) if count else ffi.NULL
    sizes = ffi.new("size_t[]", [len(b) for b in bufs]) if count else ffi.NULL
    memory, hold = page_hold()
    page_id = ffi.new("uint64_t *")
    rc = lib.dp_write_parts(cache, data, sizes, count, hold, page_id)
    if rc:
        raise error(rc, path)
    return memory, hold, page_id[0], sum(len(b) for b in bufs)


def allocate(cache: Hold, nbytes: int, path: str) -> tuple[Memory, Hold, int, int]:
    """A builder's page: (memory, hold, id, fd); the fd is the record's, valid until the
    page is sealed or the hold lets go (see builder_fd)."""
    memory, hold = page_hold()
    page_id = ffi.new("uint64_t *")
    fd = lib.dp_allocate(cache, nbytes, hold, page_id)
    if fd < 0:
        raise error(fd, path)
    return memory, hold, page_id[0], fd


def builder_fd(builder: Hold) -> int:
    """The fd of a builder's page, or -ERELEASED once it was sealed or let go of."""
    return int(lib.dp_builder_fd(builder))


def seal(builder: Hold, path: str) -> tuple[Memory, Hold]:
    """Seal a builder's page; the record moves into a new hold, returned."""
    memory, hold = page_hold()
    rc = lib.dp_seal(builder, hold)
    if rc:
        raise error(rc, path)
    return memory, hold


def empty_folder(dirfd: int, path: str) -> int:
    """Remove every entry of the folder open at dirfd; how many went."""
    n = lib.dp_empty_folder(dirfd)
    if n < 0:
        raise error(n, path)
    return int(n)


def open_page(page: Hold) -> int:
    """An fd, or a negative C error for the caller to interpret (DP_ERELEASED: released,
    let go of, or its cache closed; -ENOENT or DP_ESIZE: the file is not the page's)."""
    return int(lib.dp_page_open(page))


def map_fixed(fd: int, target: Any, nbytes: int, path: str, align: int = 1) -> int:
    """Replace `nbytes` of the pages of `target` (an anonymous mmap.mmap) with a read-only
    shared mapping of fd, starting at the first address in it that is a multiple of
    `align`; return that start's offset into `target`."""
    with ffi.from_buffer(target) as addr:
        skip = -int(ffi.cast("uintptr_t", addr)) % align
        rc = lib.dp_map_fixed(fd, addr + skip, nbytes)
    if rc:
        raise error(rc, path)
    return skip


def flush(cache: Hold) -> int:
    return int(lib.dp_flush(cache))


ENOENT = _errno.ENOENT
ESIZE = lib.DP_ESIZE
ERELEASED = lib.DP_ERELEASED
