"""CacheStats: a snapshot of a cache's counters, as ``PageCache.stats()`` returns it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a cache's counters (each read atomically, not all at one instant)."""

    live_pages: int  #: written and not released
    live_bytes: int  #: their bytes
    pending: int  #: released, file not yet removed
    pending_bytes: int
    removed: int  #: files removed since the cache opened
    remove_errors: int  #: removals that failed (the file stays until close)
    written: int  #: pages written since the cache opened
    # Why pages were released; the four add up to ``released``.
    released_by_refcount: int  #: the Page's last reference went
    released_by_gc: int  #: the cycle collector freed the Page (it was in a reference cycle)
    released_explicitly: int  #: ``release()`` or the end of a ``with page:`` block
    released_at_close: int  #: still alive when the cache closed (0 until it does)
    #: what ``max_bytes`` counts, in one atomic read: what live and pending pages, writes
    #: under way, pinned pages and files whose removal failed (until close) take on disk.
    #: A page takes its whole slot if packed (4 KiB for an empty one), else its file's
    #: whole 4 KiB blocks, one at least. 0 once closed
    charged_bytes: int
    live_disk_bytes: int  #: what the live pages take on disk (their charge)
    pending_disk_bytes: int  #: what the pending pages take on disk (their charge)
    #: released and removed pages whose bytes a view still holds (one of this process's, a
    #: read under way, or a borrower's view of a page file, in any process): they stay on
    #: disk, and charged, until the last view dies; ``pinned_bytes`` is what they take
    pinned: int
    pinned_bytes: int
    #: names ``Page.hand_over()`` made that no receiver has adopted yet, and their bytes
    #: (in the folder until adopted or closed; not charged against ``max_bytes``)
    handed: int
    handed_bytes: int
    remover: str  #: "io_uring" or "loop": how this cache removes files

    @property
    def released(self) -> int:
        by_call = self.released_explicitly + self.released_at_close
        return self.released_by_refcount + self.released_by_gc + by_call
