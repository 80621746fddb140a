"""diskpages: pages on disk whose files live exactly as long as the Python objects that
point at them, written and removed in batches by a small C core (Linux)."""

from ._cache import CacheStats, Page, PageBuilder, PageCache, default_root
from .errors import CacheClosedError, PageCacheError, PageLostError, PageReleasedError

__version__ = "0.1.0"

__all__ = [
    "PageCache",
    "Page",
    "PageBuilder",
    "CacheStats",
    "default_root",
    "PageCacheError",
    "CacheClosedError",
    "PageReleasedError",
    "PageLostError",
]
