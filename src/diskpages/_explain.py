"""Diagnostics: answers to "why is this file still here?".

explain() finds the chains of references that keep a page alive; live_pages() lists the
live pages of a cache. Diagnostics only: they walk the heap through the gc
module when called, and cost nothing on the write or release path. They change no other
thread's state: explain() reads the variables of the calling thread's frames only."""

from __future__ import annotations

import gc
import inspect
import os
import reprlib
import sys
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._pages import Page

MAX_STEPS = 5_000  # objects whose referrers explain() looks up (each scans the heap)
MAX_SECONDS = 2.0
MAX_CHAINS = 10  # chains explain() prints; it says how many more it found
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


@dataclass(frozen=True)
class LivePage:
    """One live page of a cache, as ``PageCache.live()`` yields it."""

    page: Page
    nbytes: int
    age: float  #: seconds since its bytes were written (the file's modification time)


def live_pages(cache: object) -> Iterator[LivePage]:
    """The cache's live pages, oldest id first: a list made now, so nothing of the heap walk
    (which sees every page) outlives the call."""
    now = time.time()
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks __class__, which a dead weakref.proxy
        # raises. getattr with a default, and the try: a Page another thread is still
        # building (in Page._new, between object.__new__ and its last slot) lacks some slots.
        if not issubclass(type(obj), Page) or getattr(obj, "_cache", None) is not cache:
            continue
        try:
            if not obj.released:
                found.append((obj.id, obj.nbytes, obj))
        except AttributeError:
            continue  # not built yet, so not live yet
    out = []
    for _, nbytes, page in sorted(found, key=lambda x: x[0]):
        written = page._written_at()
        if written is None:
            continue  # lost: not on disk, so not what the user is looking for
        out.append(LivePage(page, nbytes, max(0.0, now - written)))
    return iter(out)  # built at once: a suspended generator would hold every page


def _repr(obj: Any) -> str:
    try:
        return reprlib.repr(obj)
    except Exception:  # a user's __repr__ may raise: explain() must not
        return f"<{type(obj).__name__} object>"


_NO_KEY = object()


def _key(holder: dict[Any, Any], target: Any) -> Any:
    """The key under which holder has target; _NO_KEY if none (target is a key)."""
    for key, value in list(holder.items()):
        if value is target:
            return key
    return _NO_KEY


def _edge(holder: Any, target: Any) -> str:
    """How holder refers to target, as a user would write it after a name."""
    if isinstance(holder, dict):
        key = _key(holder, target)
        return "[<a key>]" if key is _NO_KEY else f"[{_repr(key)}]"
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
    if isinstance(target, dict) and (isinstance(holder, type) or getattr(holder, "__dict__", None) is target):
        return ".__dict__"  # a class's namespace (vars() gives a proxy of it), an object's
    names = list(getattr(holder, "__dict__", {}).items()) if hasattr(holder, "__dict__") else []
    for name, value in names:
        if value is target:
            return f".{name}"
    for klass in type(holder).__mro__:
        for name in getattr(klass, "__slots__", ()):
            if getattr(holder, name, None) is target:
                return f".{name}"
    return f" (referred to by a {type(holder).__name__})"


def _frame_locals(page: Page, skip: int) -> tuple[dict[int, list[str]], list[dict[str, Any]], int]:
    """id(value) -> "f() at file:line -> name", for the locals of this thread's
    function frames from explain()'s caller out, less the ``skip`` innermost (ours: they are
    no root). Module frames' locals are their globals: modules cover them.

    Also the snapshot dicts, which the caller must clear: in CPython before 3.13 reading
    f_locals caches a dict on the frame that would keep the values (the page!) alive after
    the function deletes or rebinds the variable. And how many of these frames' own
    variables (not closure cells, which the gc sees) hold the page itself: the references
    to it that the gc does not see.

    Only this thread's frames. Before 3.13, reading another thread's f_locals writes that
    frame's dict, and if the thread is inside a Python-level tracer (sys.settrace, a
    debugger, coverage) CPython writes the dict back into its variables when the tracer
    returns: clearing our snapshot would unbind them under it. A page another thread's
    variable holds shows as a reference explain() cannot see instead."""
    roots: dict[int, list[str]] = {}
    snapshots: list[dict[str, Any]] = []
    page_refs = 0
    f: types.FrameType | None = sys._getframe(2)  # explain()'s caller (explain() counts its own variable)
    depth = 0
    while f is not None:
        code = f.f_code
        if code.co_flags & inspect.CO_OPTIMIZED:
            f_locals = f.f_locals
            if isinstance(f_locals, dict):  # before 3.13: the frame's own cached dict
                snapshots.append(f_locals)
            else:  # 3.13+: a live proxy that caches nothing; read a copy
                f_locals = dict(f_locals)
            # Variables the gc sees are no extra reference: closure cells, and the frame of
            # a generator or coroutine (its object is the referrer)
            cells = (*code.co_cellvars, *code.co_freevars)
            own_refs = not code.co_flags & _SUSPENDABLE
            where = f"{code.co_name}() at {os.path.basename(code.co_filename)}:{f.f_lineno}"
            for name, value in f_locals.items():
                page_refs += own_refs and value is page and name not in cells
                if depth >= skip:
                    roots.setdefault(id(value), []).append(f"{where} -> {name}")
        f = f.f_back
        depth += 1
    return roots, snapshots, page_refs


def _gc_refs(page: Page) -> int:
    """How many references to the page the objects the gc tracks hold. Loops, not a
    generator expression: that would hold the page in a closure cell, one more referrer."""
    count = 0
    for holder in gc.get_referrers(page):
        for obj in gc.get_referents(holder):
            count += obj is page
    return count


def explain(page: Page, skip_frames: int = 1) -> str:
    """The chains of references from recognisable roots (a module's global, a local
    variable of this thread) down to the page, breadth first, shortest first; or why there
    is none."""
    modules = {id(vars(m)): name for name, m in list(sys.modules.items()) if m is not None}
    local_roots, snapshots, local_refs = _frame_locals(page, skip_frames)
    try:
        # Every reference to the page, less those we know of: ours (`page` here and
        # getrefcount's argument), this thread's variables, and the gc's objects. The rest
        # are another thread's variables (see _frame_locals), a call in progress, C code.
        unseen = sys.getrefcount(page) - 2 - local_refs - _gc_refs(page)
        chains, complete = _search(page, modules, local_roots, snapshots)
    finally:
        for snapshot in snapshots:
            # See _frame_locals: leave no reference behind. But a dict someone else holds
            # (ns = locals() in that frame) is theirs: leave it. Otherwise its references
            # are four: the frame, our list, this loop's variable, getrefcount's argument.
            if sys.getrefcount(snapshot) <= 4:
                snapshot.clear()
        snapshots.clear()
        local_roots.clear()

    head = f"page {page.id} ({page.nbytes} bytes, {page._where()})"
    if page.released:
        return f"{head} is released: its bytes are gone or going."
    cannot_see = (
        f"{unseen} reference(s) it cannot see: a variable of a function running in another "
        "thread, an argument of a call in progress, or C code"
    )
    if chains:
        shown, more = _pick(chains)
        lines = [f"{head} is kept alive by:", *(f"  {chain}" for chain in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        if unseen > 0:
            lines.append(f"  and {cannot_see}")
        if not complete:
            lines.append(
                f"  (it stopped looking after {MAX_STEPS} objects or {MAX_SECONDS:g} s: there may be more)"
            )
        return "\n".join(lines)
    if unseen > 0:
        return f"{head} is kept alive by {cannot_see}."
    if not complete:
        return f"{head}: no global or local found within {MAX_STEPS} objects or {MAX_SECONDS:g} s."
    return (
        f"{head} is not reachable from any global or any local of this thread: it is in a "
        "reference cycle, and its file goes when the cycle collector runs (gc.collect() or "
        "cache.collect()); unless another thread's variable or C code holds what holds it."
    )


def _search(
    page: Page, modules: dict[int, str], local_roots: dict[int, list[str]], snapshots: list[Any]
) -> tuple[list[tuple[object, str]], bool]:
    """Every chain from a root down to the page, breadth first so shortest first, each with
    the page's holder it goes through (its first holder); and whether the search ended
    within MAX_STEPS and MAX_SECONDS. Each object is visited once, by its shortest path."""
    # (object, its path down to the page, the page's holder that path goes through)
    queue: deque[tuple[Any, str, object]] = deque([(page, "", None)])
    seen = {id(page)}
    kept: list[list[Any]] = []  # every referrers list, alive to the end so no id is reused
    ignore = {id(queue), id(seen), id(kept), id(snapshots), id(local_roots), id(modules)}
    ignore.update(id(s) for s in snapshots)
    chains: list[tuple[object, str]] = []
    deadline = time.monotonic() + MAX_SECONDS
    try:
        for _ in range(MAX_STEPS):
            if not queue:
                return chains, True
            if time.monotonic() > deadline:
                break
            _step(queue, seen, ignore, kept, modules, local_roots, chains)
        return chains, not queue
    finally:
        queue.clear()  # on any exit, an error too: hold none of the heap
        seen.clear()
        kept.clear()


def _step(
    queue: deque[Any],
    seen: set[int],
    ignore: set[int],
    kept: list[list[Any]],
    modules: dict[int, str],
    local_roots: dict[int, list[str]],
    chains: list[tuple[object, str]],
) -> None:
    """One breadth-first step: the referrers of the next object on the queue. A local
    variable holding the object ends a chain, and so does a holder that is a module's
    globals (never marked seen: one module may hold several objects of the search)."""
    obj, path, first = queue.popleft()
    for root in local_roots.get(id(obj), ()):
        chains.append((root if first is None else first, root + path))
    referrers = gc.get_referrers(obj)
    kept.append(referrers)
    ignore.add(id(referrers))
    for holder in referrers:
        if id(holder) in ignore or id(holder) in seen or isinstance(holder, types.FrameType):
            continue
        if type(holder) is obj:
            # An instance refers to its class, but is not what keeps a class alive in any
            # sense a user means; and a class with many instances would use up the budget.
            continue
        holds = id(holder) if first is None else first
        if id(holder) in modules:
            name = _key(holder, obj)
            if isinstance(name, str):  # else obj is a key of the module's globals: no chain
                chains.append((holds, f"module {modules[id(holder)]} -> {name}{path}"))
        else:
            seen.add(id(holder))
            queue.append((holder, _edge(holder, obj) + path, holds))


def _pick(chains: list[tuple[object, str]]) -> tuple[list[str], int]:
    """At most MAX_CHAINS of the chains, shortest first, and how many are left out. The
    shortest chain of every first holder goes before any second chain of one: a list that
    twelve names hold must not hide the dict that holds the page too."""
    firsts: set[object] = set()
    shortest: list[int] = []
    others: list[int] = []
    for i, (first, _) in enumerate(chains):
        (others if first in firsts else shortest).append(i)
        firsts.add(first)
    shown = sorted((shortest + others)[:MAX_CHAINS])
    return [chains[i][1] for i in shown], len(chains) - len(shown)
