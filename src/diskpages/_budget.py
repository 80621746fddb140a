"""The budget's retry: how a write that meets ``max_bytes`` makes room, through the collector.

A write over budget removes the released pages and retries, then runs the cycle collector
in the writing thread (pages in unreachable cycles still hold their bytes) and retries
again. The gc callback here tells this thread's collections from another thread's, counts
pages the collector frees as released by it, and wakes the reapers once a collection ends.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

from . import _bindings as native
from ._stats import CacheStats
from .errors import CacheFullError


class Budgeted(Protocol):
    """What the retry needs of a cache (PageCache is the one there is)."""

    @property
    def _handle(self) -> native.Hold: ...
    @property
    def _path(self) -> Path: ...
    @property
    def _max_bytes(self) -> int | None: ...
    @property
    def _collect_when_full(self) -> bool: ...
    def remove_released(self) -> int: ...
    def stats(self) -> CacheStats: ...


# Every open cache, for the gc callback below (weak: it keeps none alive).
_caches: weakref.WeakSet[Budgeted] = weakref.WeakSet()


def watch(cache: Budgeted) -> None:
    """Have the gc callback wake ``cache``'s reaper after each collection."""
    _caches.add(cache)


class _Started(threading.local):
    """Per thread: how many collections it has started. Lets a thread tell whether
    gc.collect() collected, or returned at once because a collection was already running
    (in another thread, or in this one's finalizers: native.gc_collecting_here says which)."""

    count = 0


_started = _Started()


def _on_collection(
    phase: str,
    info: dict[str, int],
    _phase: Any = native.gc_phase,
    _take: Any = native.gc_take_releases,
    _kick: Any = native.kick,
    _caches: weakref.WeakSet[Budgeted] = _caches,
    _started: _Started = _started,
) -> None:
    """gc.callbacks hook: pages dropped in the collecting thread during a collection count
    as released by the collector, and once it ends the reapers of caches with pending pages
    drain at once (in their own thread) instead of waiting for the next batch or max_delay.
    Captures what it needs as defaults: it runs at shutdown too. The C call comes first: an
    interrupt (a signal handler's exception) can still land before it, on the function's
    first instruction, and then the next collection's start corrects the mark (see
    dp_gc_phase)."""
    _phase(phase == "start")
    if phase == "start":
        _started.count += 1
        return
    if _take():
        try:
            for cache in list(_caches):
                _kick(cache._handle)  # nothing, once closed
        except Exception:
            pass  # interpreter teardown: nothing left to kick


gc.callbacks.append(_on_collection)


# How long a thread waits for another thread's collection to end before running its own.
COLLECT_WAIT = 2.0


def _collect_here(deadline: float) -> None:
    """A full collection, run by this thread. While another thread collects (its
    finalizers let other threads run), gc.collect() returns at once and collects nothing,
    not even the cycles this thread made meanwhile: then wait for that collection to end,
    until ``deadline`` (time.monotonic()), and run one of our own."""
    while True:
        before = _started.count
        gc.collect()
        if _started.count != before or native.gc_collecting_here():
            return  # ours ran, or this is a finalizer of our own collection: no one to wait for
        if time.monotonic() >= deadline or _on_collection not in gc.callbacks:
            return  # (without our hook we cannot tell whose collection ran)
        if native.gc_collecting():
            time.sleep(0.001)  # another thread's collection: wait for it to end, then ours


def collect(cache: Budgeted) -> int:
    """``PageCache.collect()``: a collection run by this thread, then a removal; how many
    pages of ``cache`` the collection released."""
    before = cache.stats().released_by_gc
    _collect_here(time.monotonic() + COLLECT_WAIT)
    cache.remove_released()
    return cache.stats().released_by_gc - before


def make_room(cache: Budgeted, write: Any, args: tuple[Any, ...], sizes: list[int], pack: bool = True) -> Any:
    """A write met the budget: remove the released pages and retry; then run the cycle
    collector (pages in unreachable cycles still hold their bytes), remove again and
    retry, as long as that frees something. Other threads may take the room a
    collection frees, or make new garbage meanwhile: so it goes on until two
    collections in a row change nothing (no page written, released or removed by
    anyone: the bytes are held by reachable pages) or COLLECT_WAIT seconds have passed
    in all, and only then raises CacheFullError, having written nothing. Each
    collection is run by this thread (see _collect_here). A write larger than
    max_bytes on its own raises at once: no removal or collection could make room. With
    collect_when_full=False it raises at once too, and leaves the removal to the reaper.
    ``sizes``: the bytes of each page the write makes (``pack``: small ones are packed),
    for what they take on disk, which is what max_bytes counts."""
    requested = sum(sizes)
    charge = sum(native.charge_for(cache._handle, n, pack) for n in sizes)
    on_disk = f"{requested} bytes ({charge} on disk: whole slots, or 4 KiB blocks)"
    if cache._max_bytes is not None and charge > cache._max_bytes:
        what = "this page alone is"
        if len(sizes) != 1:  # all or nothing: charged as one
            what = f"these {len(sizes)} pages together are"
        raise CacheFullError(
            f"writing {on_disk} to the cache at {cache._path}: {what} larger than "
            f"max_bytes={cache._max_bytes}, so no removal or collection can make room; "
            "nothing was written"
        )
    if not cache._collect_when_full:
        native.kick(cache._handle)  # the reaper removes what was released, off this thread
        raise CacheFullError(
            f"writing {on_disk} would take the cache at {cache._path} past max_bytes="
            f"{cache._max_bytes}; nothing was written (collect_when_full=False: released "
            "pages are removed by the reaper, and no collection runs in this thread)"
        )
    deadline = time.monotonic() + COLLECT_WAIT
    cache.remove_released()
    try:
        return write(*args)
    except CacheFullError:
        pass
    unchanged = 0
    while unchanged < 2 and time.monotonic() < deadline:
        before = _progress(cache)
        _collect_here(deadline)  # pages in unreachable cycles hold their bytes until this
        cache.remove_released()
        try:
            return write(*args)
        except CacheFullError:
            pass
        unchanged = unchanged + 1 if _progress(cache) == before else 0
    s = cache.stats()
    stuck = s.charged_bytes - s.live_disk_bytes - s.pending_disk_bytes
    held = ""
    if s.pinned_bytes:
        held += f", {s.pinned_bytes} held by views of {s.pinned} removed page(s)"
        stuck -= s.pinned_bytes
    if stuck > 0 and s.remove_errors:
        held += f", {stuck} in files that could not be removed (or writes under way)"
    raise CacheFullError(
        f"writing {on_disk} would take the cache at {cache._path} past max_bytes="
        f"{cache._max_bytes}: {s.live_disk_bytes} bytes on disk are live ({s.live_pages} "
        f"pages of {s.live_bytes} bytes) and {s.pending_disk_bytes} pending{held} even after "
        "remove_released() and a full collection; nothing was written"
    ) from None


def _progress(cache: Budgeted) -> tuple[int, int, int]:
    """What changes when anyone writes, releases or removes a page of this cache."""
    s = cache.stats()
    return s.written, s.released, s.removed
