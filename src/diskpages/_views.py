"""Views' memory: the mappings that a view of a page or of a builder lives in.

A view is a memoryview over an mmap.mmap object, so Python's read-only and export rules
apply to it. A read-only view maps an anonymous placeholder and puts the file's pages over
it in C (MAP_FIXED): it keeps no file descriptor. A pinned mapping also holds the page's
bytes on disk (a pin) until its last view dies.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

from . import _bindings as native


def map_shared(fd: int, nbytes: int) -> mmap.mmap | None:
    """A builder's writable shared mapping of its (still nameless) file. A plain mmap.mmap,
    which keeps a dup of the fd while the builder or a view of it lives, so that mmap's
    resize() stays safe (it grows the file)."""
    return mmap.mmap(fd, nbytes, access=mmap.ACCESS_WRITE) if nbytes else None


# Mappings at least this long start at a multiple of it, as the kernel places a file
# mapping of its own: then a read can fault the file in as 2 MiB folios, not 4 KiB pages.
HUGE = 2 * 1024 * 1024


class HeldMapping(mmap.mmap):
    """A placeholder mapping that also keeps an fd box open for as long as it lives: a
    borrower's file on overlayfs, whose view's OFD lock would go with the fd (see
    _bindings.borrow_view)."""

    __slots__ = ("_box",)


def map_read_only(fd: int, nbytes: int, path: Path, keep: Any = None) -> memoryview:
    """A read-only view of a shared mapping of fd, held by an mmap.mmap object, so Python's
    read-only and export rules apply, but without the fd that mmap.mmap(fd, ...) keeps open
    for its whole life: we map a private read-only anonymous placeholder through mmap.mmap
    (which costs no memory commit) and put the file's pages over it in C (MAP_FIXED). For a
    large page the placeholder is 2 MiB longer, and the file goes at its first 2 MiB
    boundary. The mapping goes when the last view of it dies; ``keep``, an fd box, goes
    with it."""
    if nbytes == 0:
        return memoryview(b"")  # mmap cannot map zero bytes; an empty page needs no mapping
    mapping = placeholder(nbytes, HeldMapping)
    mapping._box = keep
    skip = native.map_fixed(fd, mapping, nbytes, str(path), align=HUGE if nbytes >= HUGE else 1)
    return view_of(mapping, skip, nbytes)


class PinnedMapping(mmap.mmap):
    """A placeholder mapping that holds a pin (dp_page_pin): the page's bytes, file or slot,
    are not freed or reused, and stay charged, until the last view of the mapping dies, or
    the mapping is closed (close(), a with block). A fork copies a view of a slot from its
    address (slotview.c), so the pin forgets the address before the mapping goes; and the
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


def placeholder(nbytes: int, cls: type[mmap.mmap] = mmap.mmap) -> Any:
    slack = HUGE if nbytes >= HUGE else 0
    return cls(-1, nbytes + slack, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


def view_of(mapping: mmap.mmap, skip: int, nbytes: int) -> memoryview:
    whole = memoryview(mapping)
    view = whole[skip : skip + nbytes]
    whole.release()  # the slice holds the mapping's export on its own
    return view
