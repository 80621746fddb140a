"""Answers to "why is this file still here?": the chains of references that keep a page
alive, and the live pages of a cache. Diagnostics only: they walk the heap through the gc
module when called, and cost nothing on the write or release path."""

from __future__ import annotations

import gc
import inspect
import os
import sys
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._cache import Page, PageCache

MAX_OBJECTS = 20_000  # referrers examined per explain(): bounded on any heap
MAX_CHAINS = 3


@dataclass(frozen=True)
class LivePage:
    """One live page of a cache, as ``PageCache.live()`` yields it."""

    page: Page
    nbytes: int
    age: float  #: seconds since its bytes were written (the file's modification time)


def live_pages(cache: PageCache) -> Iterator[LivePage]:
    from ._cache import Page

    now = time.time()
    pages = [o for o in gc.get_objects() if isinstance(o, Page) and o._cache is cache]
    for page in sorted(pages, key=lambda p: p.id):
        if page.released:
            continue
        try:
            written = os.stat(page.path).st_mtime
        except OSError:
            continue  # lost: not on disk, so not what the user is looking for
        yield LivePage(page, page.nbytes, max(0.0, now - written))


def _edge(holder: Any, target: Any) -> str:
    """How holder refers to target, as a user would write it."""
    if isinstance(holder, dict):
        for key, value in holder.items():
            if value is target:
                return f"[{key!r}]"
        return "[<a key>]"
    if isinstance(holder, (list, tuple)):
        for i, value in enumerate(holder):
            if value is target:
                return f"[{i}]"
    if isinstance(holder, (set, frozenset)):
        return " (an element)"
    if isinstance(holder, types.CellType):
        return " (a closure's variable)"
    if isinstance(holder, types.MethodType):
        return ".__self__"
    names = list(getattr(holder, "__dict__", {}).items()) if hasattr(holder, "__dict__") else []
    for name, value in names:
        if value is target:
            return f".{name}"
    for klass in type(holder).__mro__:
        for name in getattr(klass, "__slots__", ()):
            if getattr(holder, name, None) is target:
                return f".{name}"
    return f" (referred to by a {type(holder).__name__})"


def _frame_locals(own: set[int]) -> tuple[dict[int, list[str]], list[dict[str, Any]]]:
    """id(value) -> "local 'name' of f() at file:line", for the locals of every thread's
    function frames except ours (module frames' locals are their globals: modules cover
    them). Also the snapshot dicts, which the caller must clear: in CPython before 3.13
    reading f_locals caches a dict on the frame that would keep the values (the page!)
    alive after the function deletes or rebinds the variable."""
    roots: dict[int, list[str]] = {}
    snapshots: list[dict[str, Any]] = []
    own = own | {id(sys._getframe(0))}
    for top in list(sys._current_frames().values()):
        f = top
        while f is not None:
            code = f.f_code
            if id(f) not in own and code.co_flags & inspect.CO_OPTIMIZED:
                f_locals = f.f_locals
                snapshots.append(f_locals)
                where = f"{code.co_name}() at {os.path.basename(code.co_filename)}:{f.f_lineno}"
                for name, value in f_locals.items():
                    roots.setdefault(id(value), []).append(f"local {name!r} of {where}")
            f = f.f_back
    del top  # our own frame: kept, it would make a cycle that keeps the page alive
    return roots, snapshots


def explain(page: Page, skip_frames: int = 1) -> str:
    """The chains of references from recognisable roots (a module's global, a function's
    local variable) down to the page, breadth first, shortest first; or why there is none."""
    frame = sys._getframe(0)
    own = {id(frame)}
    for _ in range(skip_frames):  # PageCache.explain's frame, too
        frame = frame.f_back
        own.add(id(frame))
    del frame
    modules = {id(vars(m)): name for name, m in list(sys.modules.items()) if m is not None}
    local_roots, snapshots = _frame_locals(own)
    try:
        chains, examined = _search(page, modules, local_roots, snapshots)
    finally:
        for snapshot in snapshots:
            snapshot.clear()  # see _frame_locals: leave no reference behind
        local_roots.clear()

    head = f"page {page.id} ({page.nbytes} bytes, {page.path})"
    if page.released:
        return f"{head} is released: its file is gone or going."
    if chains:
        return "\n".join([f"{head} is kept alive by:", *(f"  {chain}" for chain in chains)])
    if examined >= MAX_OBJECTS:
        return f"{head}: no global or local found within {MAX_OBJECTS} referrers."
    return (
        f"{head} is not reachable from any global or local: it is in a reference cycle, "
        "and its file goes when the cycle collector runs (gc.collect() or cache.collect())."
    )


def _search(
    page: Page, modules: dict[int, str], local_roots: dict[int, list[str]], snapshots: list[Any]
) -> tuple[list[str], int]:
    queue: deque[tuple[Any, tuple[str, ...]]] = deque([(page, ())])
    seen = {id(page)}
    ignore = {id(queue), id(seen), id(snapshots), id(local_roots), id(modules)}
    ignore.update(id(s) for s in snapshots)
    chains: list[str] = []
    examined = 0
    while queue and len(chains) < MAX_CHAINS and examined < MAX_OBJECTS:
        obj, path = queue.popleft()
        chains.extend(root + "".join(path) for root in local_roots.get(id(obj), ()))
        referrers = gc.get_referrers(obj)
        ignore.add(id(referrers))
        for holder in referrers:
            examined += 1
            if id(holder) in ignore or id(holder) in seen or isinstance(holder, types.FrameType):
                continue
            seen.add(id(holder))
            step = _edge(holder, obj)
            if id(holder) in modules:
                name = step[1:-1] if step.startswith("[") else step
                chains.append(f"global {name} of module {modules[id(holder)]}" + "".join(path))
            else:
                queue.append((holder, (step, *path)))
        del referrers
    queue.clear()
    return chains[:MAX_CHAINS], examined
