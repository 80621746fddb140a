"""diskpages: pages on disk whose files live exactly as long as the objects that point at them.

The pages are written, then removed in batches, by a small C core (Linux)."""

from ._cache import PageCache
from ._explain import LivePage
from ._folders import default_root, sweep
from ._pages import BorrowedPage, Page, PageBuilder
from ._stats import CacheStats
from .errors import (
    CacheClosedError,
    CacheFullError,
    PageCacheError,
    PageLostError,
    PageReleasedError,
    UnsafeRootError,
)

__version__ = "0.1.0"

__all__ = [
    "PageCache",
    "Page",
    "BorrowedPage",
    "PageBuilder",
    "CacheStats",
    "LivePage",
    "default_root",
    "sweep",
    "PageCacheError",
    "CacheClosedError",
    "CacheFullError",
    "PageReleasedError",
    "PageLostError",
    "UnsafeRootError",
]
