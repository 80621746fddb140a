"""The library's own conditions. I/O failures are plain ``OSError`` subclasses
(``FileNotFoundError``, ``PermissionError``, ...) carrying errno, message and path."""


class PageCacheError(Exception):
    """Base of every error diskpages raises that is not an ``OSError``."""


class CacheClosedError(PageCacheError):
    """The cache is closed: it writes nothing more."""


class PageReleasedError(PageCacheError):
    """The page was released (or its cache closed): its bytes can no longer be read."""


class PageLostError(PageCacheError):
    """The page's file vanished or changed size under the cache (removed by someone else)."""


class CacheFullError(PageCacheError):
    """A write would take the cache past its ``max_bytes`` even after removing every
    released page and running the cycle collector. Nothing was written."""


class UnsafeRootError(PageCacheError):
    """The root folder could let someone else in: it is a symbolic link, belongs to another
    user, or others can write to it. diskpages refuses to put pages there."""
