"""The cache's finalizer: closing a cache without a reference to its PageCache object.

``weakref.finalize`` runs it when the cache is collected, and at exit through its atexit
hook, before module globals are torn down; ``close()`` runs it too, and then detaches it.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from . import _bindings as native
from ._pages import Page


def shutdown(handle: native.Hold, path: str, watched: weakref.WeakSet[Page] | None = None) -> None:
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


def shutdown_quietly(handle: Any, path: str, watched: weakref.WeakSet[Page] | None) -> None:
    try:
        shutdown(handle, path, watched)
    except OSError:
        pass  # nothing to report to at exit or in a collection; close() raises instead
