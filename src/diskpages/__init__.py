"""diskpages: pages on disk whose files live exactly as long as the Python objects that
point at them, written and removed in batches by a small C core (Linux)."""

from ._cache import BorrowedPage, CacheStats, Page, PageBuilder, PageCache
from ._explain import LivePage
from ._folders import default_root, sweep
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
