"""The library's own conditions: a small tree of exceptions under PageCacheError.

I/O failures are plain ``OSError`` subclasses
(``FileNotFoundError``, ``PermissionError``, ...) carrying errno, message and path."""

import errno


class PageCacheError(Exception):
    """Base of every error of diskpages' own (CacheFullError is an ``OSError`` as well)."""


class CacheClosedError(PageCacheError):
    """The cache is closed: it writes nothing more."""


class PageReleasedError(PageCacheError):
    """The page was released (or its cache closed): its bytes can no longer be read."""


class PageLostError(PageCacheError):
    """The page's file vanished or changed size under the cache (removed by someone else)."""


class CacheFullError(PageCacheError, OSError):
    """A write would take the cache past its ``max_bytes`` (after removing every released
    page and running the cycle collector, unless the cache was opened with
    ``collect_when_full=False``). Nothing was written. It is also an ``OSError`` with errno
    ENOSPC, so code that handles a full disk handles a full budget too."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1:  # a message: errno ENOSPC, and the message as strerror
            args = (errno.ENOSPC, args[0])
        super().__init__(*args)

    def __str__(self) -> str:
        return super().__str__() if self.strerror is None else str(self.strerror)


class UnsafeRootError(PageCacheError):
    """The root folder could let someone else in: it is a symbolic link, belongs to another
    user, or others can write to it. diskpages refuses to put pages there."""
