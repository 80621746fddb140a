"""``diskpages.zict.File``: a drop-in for ``zict.File`` whose values are pages.

``zict.File`` keeps one file per key and removes it with ``os.remove`` in the thread that
deletes the key; here each value is a Page of a PageCache, so a delete is a release
(no system call) and the reaper removes the bytes off the caller's thread. Small values
are packed as slots, so writing and dropping one touches no file system metadata. Uses
only diskpages' public API; zict itself is optional (with it, File is a ``ZictBase``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from . import CacheClosedError, Page, PageCache, PageReleasedError

if TYPE_CHECKING:
    from zict.common import ZictBase as _Base
else:
    try:  # with zict installed, a zict mapping like any other (lock, discard, close, update)
        from zict.common import ZictBase as _Base
    except ImportError:  # pragma: no cover - zict is in the test extra
        _Base = MutableMapping

__all__ = ["File"]


class File(_Base[Any, Any]):
    """A mutable mapping of keys to bytes, stored as pages of ``self.cache``, a PageCache
    rooted at ``directory`` (its pages go in a private folder there); ``cache_options``
    go to PageCache (``max_bytes``, ``pack_max``, ``sync``...).

    As ``zict.File``: keys are ``str`` (or ``bytes``); a value is a bytes-like object, or a
    list or tuple of them, written as one page without joining them in memory
    (``PageCache.write_parts``); ``z[key]`` returns a new ``bytearray``, or with
    ``memmap=True`` a zero-copy memoryview (read-only here: a page never changes, and the
    view stays valid after the key is deleted or replaced). Unlike ``zict.File``, a
    setting that fails leaves the key's old value, ``del`` removes nothing in the calling
    thread, and the folder's content is not read back: pages live exactly as long as the
    mapping holds them, and ``close()`` (or the end of a ``with`` block, or the process)
    removes them all. Thread-safe.
    """

    def __init__(self, directory: str | os.PathLike[str], memmap: bool = False, **cache_options: Any):
        if "root" in cache_options:  # else: "got multiple values for argument 'root'"
            raise TypeError(f"{type(self).__name__} takes no root=: directory is the cache's root")
        super().__init__()
        self.lock = threading.RLock()  # as ZictBase's: held for the dict, never across I/O
        self.directory = os.fspath(directory)
        self.memmap = memmap
        self._pages: dict[Hashable, Page] = {}
        self._closed = False
        # last: once it exists nothing can fail here, so no traceback keeps a cache open
        self.cache = PageCache(directory, **cache_options)

    def _check_key(self, key: object) -> None:
        if not isinstance(key, (str, bytes)):
            raise TypeError(f"keys must be str or bytes, not {type(key).__name__}")

    # -- the mapping --------------------------------------------------------------------

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check_key(key)
        if isinstance(value, (list, tuple)):
            page = self.cache.write_parts(value)
        else:
            page = self.cache.write(value)  # TypeError for what is not bytes-like
        with self.lock:
            closed, old = self._closed, None
            if not closed:
                old = self._pages.get(key)
                self._pages[key] = page
        if closed:  # close() ran while this page was being written: it is nobody's
            page.release()
            raise CacheClosedError(f"{self} is closed")
        if old is not None:
            old.release()

    def __getitem__(self, key: Any) -> bytearray | memoryview:
        while True:
            with self.lock:
                page = self._pages[key]  # KeyError
            try:
                if self.memmap:
                    return page.view()
                out = bytearray(page.nbytes)
                page.readinto(out)
                return out
            except PageReleasedError:
                # deleted or replaced by another thread since: look again
                with self.lock:
                    if self._pages.get(key) is page:
                        raise

    def __delitem__(self, key: Any) -> None:
        with self.lock:
            page = self._pages.pop(key)  # KeyError
        page.release()  # O(1), no system call: the reaper removes it

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._pages
        except TypeError:  # unhashable
            return False

    def __iter__(self) -> Iterator[Any]:
        return iter(self._pages)

    def __len__(self) -> int:
        return len(self._pages)

    def __str__(self) -> str:
        return f"<{type(self).__name__}: {self.directory}, {len(self)} elements>"

    __repr__ = __str__

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Release every page and close the cache: its folder, files, file descriptors
        and thread are gone when this returns. Idempotent."""
        with self.lock:
            self._closed = True
            pages, self._pages = self._pages, {}
        for page in pages.values():
            page.release()
        self.cache.close()

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # zict closes a mapping in __del__; here the cache's own finalizer does, and the
        # pages go with this mapping's dict. Nothing to do that could fail at shutdown.
        pass

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: its pages belong to this process "
            "(pickle the values, or hand pages over with Page.hand_over())"
        )
