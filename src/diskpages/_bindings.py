"""One small function per C function of csrc/diskpages.h: call it, turn the result into a
Python value or an exception. No policy lives here; the public classes decide."""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence
from typing import Any

from ._native import ffi, lib
from .errors import CacheClosedError, CacheFullError

SYNC_MODES = {"none": lib.DP_SYNC_NONE, "data": lib.DP_SYNC_DATA, "full": lib.DP_SYNC_FULL}
REMOVERS = {"auto": lib.DP_REMOVE_AUTO, "loop": lib.DP_REMOVE_LOOP}
REMOVER_NAMES = {lib.DP_REMOVE_LOOP: "loop", lib.DP_REMOVE_URING: "io_uring"}
WRITE_METHODS = {"pwrite": lib.DP_WRITE_PWRITE, "mmap": lib.DP_WRITE_MMAP}

# The release path: plain references to the C functions, so that a finalizer running at
# interpreter shutdown (module globals already None) can still reach them.
release = lib.dp_release
released = lib.dp_released
page_drop = lib.dp_page_drop
# The gc callback's calls (it runs at shutdown too)
gc_phase = lib.dp_gc_phase
gc_collecting = lib.dp_gc_collecting
gc_collecting_here = lib.dp_gc_collecting_here
gc_take_releases = lib.dp_gc_take_releases
kick = lib.dp_kick

Handle = Any  # a cdata 'dp_cache *' owned through ffi.gc
Record = Any  # a cdata 'dp_page *'


def error(code: int, path: os.PathLike[str] | str | None = None) -> Exception:
    """The exception for a negative C result; returned, not raised, so callers ``raise`` it."""
    code = -code
    if code == lib.DP_ECLOSED:
        return CacheClosedError("the cache is closed")
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
) -> Handle:
    out = ffi.new("dp_cache **")
    rc = lib.dp_cache_open(dirfd, sync, batch, max_delay_ns, remover, max_bytes, out)
    if rc:
        raise error(rc, path)
    return ffi.gc(out[0], lib.dp_cache_free)


def cache_close(handle: Handle, path: str) -> bool:
    """Empty the cache's folder; False (and nothing removed) in a forked child, where the
    folder is the parent's."""
    rc = lib.dp_cache_close(handle)
    if rc == -lib.DP_EFORKED:
        return False
    if rc:
        raise error(rc, path)
    return True


def cache_stats(handle: Handle) -> dict[str, int]:
    out = ffi.new("dp_stats *")
    lib.dp_cache_stats(handle, out)
    return {name: getattr(out, name) for name, _ in ffi.typeof("dp_stats").fields}


def as_buffer(data: Any) -> Any:
    """A cdata over any C-contiguous bytes-like object; TypeError for anything else."""
    try:
        return ffi.from_buffer(data)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(data).__name__!r}") from None
    except (ValueError, BufferError):
        raise BufferError(f"the {type(data).__name__} is not C-contiguous") from None


def write(handle: Handle, data: Any, method: int, path: str) -> tuple[Record, int, int]:
    buf = as_buffer(data)
    page = ffi.new("dp_page **")
    page_id = ffi.new("uint64_t *")
    rc = lib.dp_write(handle, buf, len(buf), method, page, page_id)
    if rc:
        raise error(rc, path)
    return page[0], page_id[0], len(buf)


def write_many(
    handle: Handle, buffers: Sequence[Any], method: int, path: str
) -> list[tuple[Record, int, int]]:
    count = len(buffers)
    bufs = [as_buffer(b) for b in buffers]  # every check happens before any file is made
    data = ffi.new("void *[]", bufs) if count else ffi.NULL
    sizes = ffi.new("size_t[]", [len(b) for b in bufs]) if count else ffi.NULL
    pages = ffi.new("dp_page *[]", max(count, 1))
    ids = ffi.new("uint64_t[]", max(count, 1))
    failed_at = ffi.new("size_t *")
    rc = lib.dp_write_many(handle, data, sizes, count, method, pages, ids, failed_at)
    if rc:
        exc = error(rc, path)
        if failed_at[0] < count:
            exc.add_note(f"writing buffer {failed_at[0]} of {count}; no page of this call was kept")
        raise exc
    return [(pages[i], ids[i], len(bufs[i])) for i in range(count)]


def write_parts(handle: Handle, parts: Sequence[Any], path: str) -> tuple[Record, int, int]:
    """One page whose bytes are the parts laid end to end, written without joining them."""
    bufs = [as_buffer(p) for p in parts]
    count = len(bufs)
    data = ffi.new("void *[]", bufs) if count else ffi.NULL
    sizes = ffi.new("size_t[]", [len(b) for b in bufs]) if count else ffi.NULL
    page = ffi.new("dp_page **")
    page_id = ffi.new("uint64_t *")
    rc = lib.dp_write_parts(handle, data, sizes, count, page, page_id)
    if rc:
        raise error(rc, path)
    return page[0], page_id[0], sum(len(b) for b in bufs)


def allocate(handle: Handle, nbytes: int, path: str) -> tuple[Record, int, int]:
    page = ffi.new("dp_page **")
    page_id = ffi.new("uint64_t *")
    fd = lib.dp_allocate(handle, nbytes, page, page_id)
    if fd < 0:
        raise error(fd, path)
    return page[0], page_id[0], fd


def seal(handle: Handle, record: Record, fd: int, path: str) -> None:
    rc = lib.dp_seal(handle, record, fd)
    if rc:
        raise error(rc, path)


def empty_folder(dirfd: int, path: str) -> int:
    """Remove every entry of the folder open at dirfd; how many went."""
    n = lib.dp_empty_folder(dirfd)
    if n < 0:
        raise error(n, path)
    return int(n)


def open_page(handle: Handle, page_id: int, nbytes: int) -> int:
    """An fd, or a negative C error for the caller to interpret (it knows if the page was
    released, which decides between PageReleasedError and PageLostError)."""
    return lib.dp_open_page(handle, page_id, nbytes)


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


def flush(handle: Handle) -> int:
    return int(lib.dp_flush(handle))


ENOENT = _errno.ENOENT
ESIZE = lib.DP_ESIZE
