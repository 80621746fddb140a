"""Random interleavings of the public API, with the lifetime invariants checked after every
step: a hypothesis RuleBasedStateMachine.

The machine writes pages (write, write_many, allocate + fill + seal, write_array,
allocate_array), takes views and arrays, releases and drops pages and views, puts pages
and builders in reference cycles, drops and breaks those, collects, flushes, pickles,
closes the cache and opens a fresh one, and asks explain() and live(). It keeps a model of
what must be true and checks it against the public API, the folder and /proc/self:

- every page it holds that is not released reads back its bytes (read() and view());
  every released one is inert: ``released`` is True, read()/view()/array()/pickle raise
  PageReleasedError, release() just returns;
- every view or array it holds reads its bytes, whatever happened to the page or cache;
- the folder holds a file for every unreleased page with a file of its own, and a slot
  whose tag names it for every unreleased packed page, none for an unsealed builder, and
  after remove_released() exactly those (the slot of a released page that a view still pins may
  keep its tag: it is not free until the view dies; the view's bytes never change);
  stats() counts the live pages and builders and their bytes, and the releases by cause;
- open fds and mappings of the cache's files never exceed what the builders and views it
  holds (and the segments of packed pages) account for, and come back to where they
  started at teardown.

Both machines run for pages with files of their own and for packed pages (the `packing`
fixture).

Collected cycles that resurrect their pages (a ``__del__`` that stores them in a global),
and gc.DEBUG_SAVEALL, give back Page and PageBuilder objects whose finalizer already ran:
those must be released and inert too. Those rules run in ``ZombieMachine``; by default its
test runs in a child interpreter, so that a crash there (a use-after-free in C) fails one
test instead of killing the session. DISKPAGES_SM_ZOMBIES=1 runs it in this process (what
the child does); DISKPAGES_SM_ZOMBIES=0 skips it.

The pages are small (0 to 64 KiB) and each one's bytes start with a unique counter, so a
page that returns another page's bytes is named in the failure.
"""

from __future__ import annotations

import functools
import gc
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from diskpages import (
    BorrowedPage,
    CacheClosedError,
    Page,
    PageBuilder,
    PageCache,
    PageLostError,
    PageReleasedError,
)
from diskpages import _bindings as native

from conftest import page_files_on_disk, segment_count, slot_ids_on_disk

np = pytest.importorskip("numpy")

pytestmark = [pytest.mark.lifetime, pytest.mark.usefixtures("packing")]

ZOMBIES_ENV = "DISKPAGES_SM_ZOMBIES"

# Each machine runs twice (files, packed: the packing fixture), so half the examples each:
# the total is what one run had before packing, and CI stays under its ten minutes.
SETTINGS = settings(
    max_examples=30,
    stateful_step_count=35,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Where Resurrector.__del__ puts the objects it holds.
RESURRECTED: list[Any] = []

# The child interpreter of test_zombie_state_machine logs every step here, unbuffered, so
# that a crash (which leaves hypothesis no chance to print the example) still shows the
# steps that led to it.
LOG_ENV = "DISKPAGES_SM_LOG"
_STEP_LOG = (
    os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    if os.environ.get(LOG_ENV)
    else None
)


def log_step(text: str) -> None:
    if _STEP_LOG is not None:
        os.write(_STEP_LOG, (text + "\n").encode())


def logged(fn: Any) -> Any:
    """A rule that logs itself before it runs (hypothesis prints a step after it ran)."""

    @functools.wraps(fn)
    def step(self: Any, **kwargs: Any) -> Any:
        log_step(f"state.{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})")
        return fn(self, **kwargs)

    return step


class Cycle:
    """An object in a reference cycle with itself, holding pages and builders."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.me = self


class Resurrector(Cycle):
    """A cycle whose finalizer brings what it holds back to life."""

    def __del__(self) -> None:
        RESURRECTED.extend(self.items)


# -- the model ----------------------------------------------------------------------------


@dataclass(eq=False)
class CycleRec:
    obj: Cycle | None  # None once the machine dropped it (then only gc can free it)
    members: list[Any]  # PageRec / BuilderRec, in the order of obj.items
    resurrect: bool


def key_of(obj: Page | PageBuilder) -> str:
    """A page's (or builder's) key in the model: the path its file has or would have,
    unique across caches. A packed page has no file (page.path raises), but a key all the
    same."""
    return str(obj._cache.path / native.page_name(obj.id))


@dataclass(eq=False)
class PageRec:
    key: str  # the page's path (see key_of): unique across caches
    gen: int  # which cache (the machine opens a fresh one after close)
    data: bytes
    arr: Any = None  # the expected array, for .npy pages
    obj: Page | None = None  # the machine's direct reference
    cycle: CycleRec | None = None  # a cycle (held or dropped) that holds the object
    zombie: Page | None = None  # finalized, but brought back (resurrected or gc.garbage)
    released: bool = False
    removed: bool = False  # its file is known to be gone (its slot freed, unless pinned)
    packed: bool = False  # a slot in a segment, not a file of its own
    id: int = 0
    # pages of this cache that are one file (adopt() of a file page links it): a view of
    # any of them holds the file, and C counts it where the file's last name goes
    links: dict | None = None
    kind = "page"

    @property
    def alive(self) -> bool:
        return self.obj is not None or self.cycle is not None or self.zombie is not None

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(eq=False)
class BuilderRec:
    key: str
    gen: int
    nbytes: int
    data: bytearray | None  # what the mapping holds (None for array builders)
    arr: Any = None  # the expected array, for allocate_array builders
    obj: PageBuilder | None = None
    cycle: CycleRec | None = None
    zombie: PageBuilder | None = None
    sealed: bool = False
    finalized: bool = False  # dropped or collected unsealed: its record is released
    kind = "builder"

    @property
    def alive(self) -> bool:
        return self.obj is not None or self.cycle is not None or self.zombie is not None

    @property
    def live(self) -> bool:  # counts in stats().live_pages
        return not self.sealed and not self.finalized


@dataclass(eq=False)
class ViewRec:
    owner: Any  # PageRec or BuilderRec
    view: Any  # memoryview or ndarray
    expect: Any  # bytes, or an ndarray for arrays; None: a builder view, read its rec
    mapped: bool  # holds a mapping of a cache file
    pins: bool = False  # a page's own view: its bytes (file or slot) stay, pinned, until it dies


@dataclass(eq=False)
class BorrowRec:
    owner: PageRec
    handle: BorrowedPage


@dataclass(eq=False)
class CacheRec:
    cache: PageCache
    gen: int
    path: Path
    causes: Counter = field(default_factory=Counter)


def fd_targets() -> list[str]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass  # the listdir's own fd, closed by now
    return out


def mappings_under(root: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.rstrip("\n") for line in f if root in line]


def page_bytes(counter: int, size: int, seed: int) -> bytes:
    """size bytes: a unique prefix (the counter) then random bytes."""
    body = random.Random(seed).randbytes(size)
    return (struct.pack(">Q", counter) + body)[:size]


sizes = st.one_of(st.sampled_from([0, 1, 8, 4095, 4096, 4097, 65536]), st.integers(0, 65536))
seeds = st.integers(0, 2**32 - 1)
index = st.integers(0, 10_000)
dtypes = st.sampled_from(["u1", "<i4", ">f8", "c8", "<U3", "?"])
shapes = st.lists(st.integers(0, 7), max_size=3).map(tuple)
layouts = st.sampled_from(["C", "F", "strided"])


class Machine(RuleBasedStateMachine):
    zombies = False  # ZombieMachine: resurrection and DEBUG_SAVEALL rules

    def __init__(self) -> None:
        super().__init__()
        log_step(f"state = {type(self).__name__}()")
        self.gc_was_enabled = gc.isenabled()
        gc.disable()  # only the machine's own collections: the model knows when cycles go
        # Everything alive now (pytest, hypothesis, numpy: a heap of a few hundred thousand
        # objects) goes to the permanent generation, so the machine's many full collections
        # scan only what was made since: a few ms each instead of 100. teardown unfreezes.
        gc.freeze()
        del RESURRECTED[:]
        self.root = tempfile.mkdtemp(prefix="dp-sm-", dir="/tmp")
        self.counter = 0
        self.fd_start = len(fd_targets())
        self.caches: list[CacheRec] = []
        self.pages: list[PageRec] = []  # every page record ever (the model)
        self.builder_recs: list[BuilderRec] = []
        self.held: list[PageRec] = []  # pages the machine refers to directly
        self.builders: list[BuilderRec] = []  # unsealed builders it refers to directly
        self.cycles: list[CycleRec] = []  # cycles it holds
        self.dropped: list[CycleRec] = []  # cycles it dropped, not yet collected
        self.zombies_held: list[Any] = []  # PageRec / BuilderRec with .zombie set
        self.views: list[ViewRec] = []
        self.borrows: list[BorrowRec] = []
        self.open_cache()

    # -- helpers --------------------------------------------------------------------------

    @property
    def cur(self) -> CacheRec:
        return self.caches[-1]

    @property
    def cache(self) -> PageCache:
        return self.cur.cache

    def open_cache(self) -> None:
        cache = PageCache(self.root, max_delay=30.0, batch=2**31 - 1)
        self.caches.append(CacheRec(cache, len(self.caches), cache.path))
        # What the open caches hold (folder fd, io_uring): counted from here.
        self.fd_baseline = len(fd_targets())

    def unique(self) -> int:
        self.counter += 1
        return self.counter

    def whose(self, data: Any) -> str:
        """Which page's bytes these are, for failure messages."""
        try:
            data = bytes(data)
        except Exception:
            return f"a {type(data).__name__}"
        for rec in self.pages:
            if rec.data == data:
                return f"{len(data)} bytes, those of page {rec.key} (released={rec.released})"
        for brec in self.builder_recs:
            if brec.data is not None and bytes(brec.data) == data:
                return f"{len(data)} bytes, those of builder {brec.key} (finalized={brec.finalized})"
        return f"{len(data)} bytes that are no page's: {data[:16]!r}..."

    def expect_error(self, exc_type: Any, call: Any, what: str) -> None:
        """call() must raise exc_type (a class or a tuple of them). Keeps no reference to
        the exception, whose traceback would keep the caller's locals (pages) alive."""
        names = " or ".join(e.__name__ for e in (exc_type if isinstance(exc_type, tuple) else (exc_type,)))
        try:
            result = call()
        except exc_type:
            return
        except Exception as exc:
            raise AssertionError(f"{what} raised {type(exc).__name__}({exc}) instead of {names}") from None
        desc = self.whose(result) if isinstance(result, (bytes, memoryview)) else repr(result)
        del result
        raise AssertionError(f"{what} returned {desc} instead of raising {names}")

    def obj_of(self, rec: Any) -> Any:
        """The machine's way to the object of rec, if it has one."""
        if rec.obj is not None:
            return rec.obj
        if rec.zombie is not None:
            return rec.zombie
        if rec.cycle is not None and rec.cycle.obj is not None:
            return rec.cycle.obj.items[rec.cycle.members.index(rec)]
        return None

    def reachable_pages(self) -> list[tuple[PageRec, Page]]:
        out = []
        for rec in self.pages:
            obj = self.obj_of(rec)
            if obj is not None:
                out.append((rec, obj))
        return out

    def pick(self, seq: list[Any], i: int) -> Any:
        return seq[i % len(seq)]

    def new_page(self, page: Page, data: bytes, arr: Any = None) -> PageRec:
        assert isinstance(page, Page), page
        rec = PageRec(key_of(page), self.cur.gen, data, arr, obj=page, packed=page.packed, id=page.id)
        if rec.packed:
            self.expect_error(ValueError, lambda: page.path, "path of a packed page")
        else:
            assert page.path.parent == self.cache.path
        assert not any(r.key == rec.key for r in self.pages), f"two pages at {rec.key}"
        assert page.nbytes == len(data)
        self.pages.append(rec)
        self.held.append(rec)
        return rec

    def died(self, rec: Any, cause: str) -> None:
        """rec's object was freed (refcount) or finalized (the collector)."""
        cache_open = not self.caches[rec.gen].cache.closed
        if rec.kind == "page":
            if not rec.released:
                rec.released = True
                if cache_open:
                    self.caches[rec.gen].causes[cause] += 1
        elif not rec.sealed and not rec.finalized:
            rec.finalized = True
            if cache_open:
                self.caches[rec.gen].causes[cause] += 1

    def drop_ref(self, rec: Any) -> None:
        """The machine's direct reference to rec's object goes."""
        rec.obj = None
        if not rec.alive:
            self.died(rec, "refcount")

    def collect(self, saveall: bool = False) -> None:
        """gc.collect(), and what it does to the model: each dropped cycle is collected; its
        members that nothing else reaches are finalized (released), and come back as zombies
        if the cycle resurrects them or DEBUG_SAVEALL keeps them."""
        garbage_before = len(gc.garbage)
        if saveall:
            old = gc.get_debug()
            gc.set_debug(old | gc.DEBUG_SAVEALL)
            try:
                gc.collect()
            finally:
                gc.set_debug(old)
        else:
            gc.collect()
        expect: dict[tuple[str, str], Any] = {}
        for cyc in self.dropped:
            for rec in cyc.members:
                rec.cycle = None
                if rec.obj is not None:
                    continue  # reachable from the machine: not finalized
                self.died(rec, "gc")
                if cyc.resurrect or saveall:
                    expect[(rec.kind, rec.key)] = rec
        self.dropped = []
        found = list(RESURRECTED)
        del RESURRECTED[:]
        found += [
            o
            for o in gc.garbage[garbage_before:]
            if isinstance(o, (Page, PageBuilder)) and key_of(o).startswith(self.root + "/")
        ]
        del gc.garbage[garbage_before:]
        got: dict[tuple[str, str], Any] = {}
        for obj in found:
            kind = "page" if isinstance(obj, Page) else "builder"
            got.setdefault((kind, key_of(obj)), obj)
        del found
        if saveall:
            # What DEBUG_SAVEALL kept (the cycles themselves too) is garbage again, and still
            # refers to everything it held, shared pages and builders included: free it now
            # (finalizers do not run twice), leaving alive only what the machine holds.
            gc.collect()
        for key, obj in got.items():
            rec = expect.get(key)
            if rec is None:
                # a member the machine still refers to, handed back by a Resurrector
                direct = [r for r in self.pages + self.builder_recs if (r.kind, r.key) == key]
                assert direct and direct[0].obj is obj, f"{key} came back from the collector unexpectedly"
                continue
            rec.zombie = obj
            self.zombies_held.append(rec)
        missing = set(expect) - set(got)
        assert not missing, f"collected objects that did not come back: {sorted(missing)}"

    def flush_model(self, gen: int) -> None:
        for rec in self.pages:
            if rec.gen == gen and rec.released:
                rec.removed = True

    def pinned(self, rec: PageRec) -> bool:
        """Whether a view the machine holds pins rec's bytes (its file or its slot)."""
        return any(v.owner is rec and v.pins for v in self.views)

    def check_files_exact(self) -> None:
        """Right after remove_released(): the folder holds exactly the unreleased pages' files, and
        its segments' tags name exactly the unreleased packed pages (and maybe released
        ones whose slot a view still pins)."""
        mine = [r for r in self.pages if r.gen == self.cur.gen]
        want = {Path(r.key).name for r in mine if not r.released and not r.packed}
        have = page_files_on_disk(self.cache.path)
        assert have == want, f"after flush: extra files {sorted(have - want)}, missing {sorted(want - have)}"
        # (a released page's slot that a view pins is not free yet: its tag may stay)
        want_ids = {r.id for r in mine if r.packed and not r.released}
        may_ids = want_ids | {r.id for r in mine if r.packed and self.pinned(r)}
        have_ids = slot_ids_on_disk(self.cache.path)
        assert want_ids <= have_ids <= may_ids, (
            f"after flush: slots of pages {sorted(have_ids - may_ids)} still tagged, "
            f"of pages {sorted(want_ids - have_ids)} missing"
        )
        s = self.cache.stats()
        assert (s.pending, s.pending_bytes) == (0, 0), f"after flush: {s}"
        # removed pages whose bytes the machine's views hold: pinned, and still charged.
        # Pages that are one file (linked by adopt()) are counted by the file, where its
        # last name goes, not by whose view it is: each of them may or may not be pinned.
        pinned = [r for r in mine if r.released and self.pinned(r) and r.links is None]
        maybe = [
            r
            for r in mine
            if r.released and r.links is not None and any(self.pinned(x) for x in r.links.values())
        ]

        def charge(recs):  # what they take on disk: a whole slot, or a file's whole blocks
            return sum(native.charge_for(self.cache._handle, r.nbytes, r.packed) for r in recs)

        assert len(pinned) <= s.pinned <= len(pinned) + len(maybe), (
            f"after flush: {s}; the machine's views pin {[r.key for r in pinned]}, maybe "
            f"{[r.key for r in maybe]}"
        )
        assert charge(pinned) <= s.pinned_bytes <= charge(pinned) + charge(maybe), f"after flush: {s}"

    # -- writing ----------------------------------------------------------------------------

    @rule(size=sizes, seed=seeds)
    @logged
    def write(self, size: int, seed: int) -> None:
        data = page_bytes(self.unique(), size, seed)
        self.new_page(self.cache.write(data), data)

    @rule(specs=st.lists(st.tuples(sizes, seeds), max_size=4), as_bytearray=st.booleans())
    @logged
    def write_many(self, specs: list[tuple[int, int]], as_bytearray: bool) -> None:
        datas = [page_bytes(self.unique(), size, seed) for size, seed in specs]
        bufs = [bytearray(d) if as_bytearray else d for d in datas]
        pages = self.cache.write_many(bufs)
        assert len(pages) == len(datas)
        for page, data in zip(pages, datas, strict=True):
            self.new_page(page, data)

    @rule(specs=st.lists(st.tuples(st.integers(0, 40000), seeds), max_size=5))
    @logged
    def write_parts(self, specs: list[tuple[int, int]]) -> None:
        parts = [page_bytes(self.unique(), size, seed) for size, seed in specs]
        self.new_page(self.cache.write_parts(parts), b"".join(parts))

    @precondition(lambda self: any(r.gen == self.cur.gen for r, _ in self.reachable_pages()))
    @rule(i=index, hand_over=st.booleans())
    @logged
    def adopt(self, i: int, hand_over: bool) -> None:
        """A page of this cache made from another (here, the same cache's: the same code
        paths), through a handed-over name or a borrower's pickle."""
        rec, obj = self.pick([(r, o) for r, o in self.reachable_pages() if r.gen == self.cur.gen], i)
        if rec.released:
            what = obj.hand_over if hand_over else functools.partial(pickle.dumps, obj)
            self.expect_error(PageReleasedError, what, f"hand over / pickle of released {rec.key}")
            return
        handle = obj.hand_over() if hand_over else pickle.loads(pickle.dumps(obj))
        del obj
        handle = pickle.loads(pickle.dumps(handle))  # as if from another process
        new = self.new_page(self.cache.adopt(handle), rec.data)
        if not rec.packed and not new.packed:  # linked: one file, two pages
            group = rec.links if rec.links is not None else {id(rec): rec}
            group[id(new)] = new
            rec.links = new.links = group
        if hand_over:
            assert not handle.path.exists(), "adopt() left the handed-over name"

    @rule(size=sizes, seed=seeds)
    @logged
    def allocate_fill_seal(self, size: int, seed: int) -> None:
        data = page_bytes(self.unique(), size, seed)
        builder = self.cache.allocate(size)
        view = builder.view()
        assert len(view) == size and not view.readonly
        assert bytes(view) == bytes(size), "a new builder is not zero-filled"
        view[:] = data
        view.release()
        page = builder.seal()
        del builder
        self.new_page(page, data)

    @rule(size=sizes, seed=seeds, keep_view=st.booleans())
    @logged
    def start_builder(self, size: int, seed: int, keep_view: bool) -> None:
        data = page_bytes(self.unique(), size, seed)
        builder = self.cache.allocate(size)
        rec = BuilderRec(str(builder.path), self.cur.gen, size, bytearray(data), obj=builder)
        self.builder_recs.append(rec)
        self.builders.append(rec)
        view = builder.view()
        view[:] = data
        if keep_view:
            self.views.append(ViewRec(rec, view, None, mapped=size > 0))
        else:
            view.release()

    @rule(dtype=dtypes, shape=shapes, layout=layouts)
    @logged
    def write_array(self, dtype: str, shape: tuple[int, ...], layout: str) -> None:
        base = self.unique() * 1000
        if layout == "strided":
            big = (np.arange(2 * max(1, int(np.prod(shape)))) + base).astype(dtype)
            arr = big[::2][: int(np.prod(shape))].reshape(shape) if shape else big[0]
        else:
            arr = np.asarray(
                (np.arange(int(np.prod(shape))) + base).astype(dtype).reshape(shape), order=layout
            )
        page = self.cache.write_array(arr)
        got = page.array()
        assert got.shape == arr.shape and got.dtype == arr.dtype and np.array_equal(got, arr)
        assert not got.flags.writeable
        del got
        self.new_page(page, page.read(), arr.copy())

    @rule(dtype=dtypes, shape=shapes, seal=st.booleans(), keep_array=st.booleans())
    @logged
    def allocate_array(self, dtype: str, shape: tuple[int, ...], seal: bool, keep_array: bool) -> None:
        base = self.unique() * 1000
        values = (np.arange(int(np.prod(shape))) + base).astype(dtype).reshape(shape)
        builder = self.cache.allocate_array(shape, dtype)
        arr = builder.array()
        assert arr.shape == values.shape and arr.dtype == values.dtype and arr.flags.writeable
        arr[...] = values
        if seal:
            del arr
            page = builder.seal()
            del builder
            got = page.array()
            assert np.array_equal(got, values) and got.dtype == values.dtype
            del got
            self.new_page(page, page.read(), values)
            return
        rec = BuilderRec(str(builder.path), self.cur.gen, builder.nbytes, None, values, obj=builder)
        self.builder_recs.append(rec)
        self.builders.append(rec)
        if keep_array:
            self.views.append(ViewRec(rec, arr, values, mapped=True))

    @precondition(lambda self: self.builders)
    @rule(i=index)
    @logged
    def seal_builder(self, i: int) -> None:
        rec = self.pick(self.builders, i)
        builder = rec.obj
        if self.cache.closed or rec.gen != self.cur.gen:
            self.expect_error(CacheClosedError, builder.seal, "seal() of a builder of a closed cache")
            return
        exported = any(v.owner is rec and v.mapped for v in self.views)
        if exported:
            self.expect_error(BufferError, builder.seal, "seal() while a view of the builder is alive")
            view = builder.view()  # and the builder is as it was
            assert rec.data is None or bytes(view) == bytes(rec.data)
            view.release()
            return
        page = builder.seal()
        assert builder.sealed
        self.expect_error(ValueError, builder.seal, "a second seal()")
        self.expect_error(ValueError, builder.view, "view() of a sealed builder")
        del builder
        rec.sealed = True
        self.builders.remove(rec)
        rec.obj = None
        if rec.arr is not None:
            got = page.array()
            assert np.array_equal(got, rec.arr) and got.dtype == rec.arr.dtype
            del got
            self.new_page(page, page.read(), rec.arr)
        else:
            assert page.read() == bytes(rec.data)
            self.new_page(page, bytes(rec.data))

    @precondition(lambda self: self.builders)
    @rule(i=index)
    @logged
    def drop_builder(self, i: int) -> None:
        rec = self.pick(self.builders, i)
        self.builders.remove(rec)
        self.drop_ref(rec)

    @precondition(lambda self: any(v.owner.kind == "builder" and v.expect is None for v in self.views))
    @rule(i=index, seed=seeds)
    @logged
    def scribble(self, i: int, seed: int) -> None:
        """Write into a builder's view: while the builder lives, or after it went (the
        mapping stays valid: the bytes just go nowhere)."""
        vrec = self.pick([v for v in self.views if v.owner.kind == "builder" and v.expect is None], i)
        n = len(vrec.view)
        if n == 0:
            return
        rnd = random.Random(seed)
        start = rnd.randrange(n)
        chunk = rnd.randbytes(rnd.randint(1, n - start))
        vrec.view[start : start + len(chunk)] = chunk
        vrec.owner.data[start : start + len(chunk)] = chunk

    # -- reading, views -----------------------------------------------------------------------

    @precondition(lambda self: self.reachable_pages())
    @rule(i=index, lo=st.integers(0, 70000), hi=st.integers(0, 70000))
    @logged
    def take_view(self, i: int, lo: int, hi: int) -> None:
        rec, obj = self.pick(self.reachable_pages(), i)
        if rec.released:
            self.expect_error(PageReleasedError, obj.view, "view() of a released page")
            return
        view = obj.view()
        assert view.readonly and bytes(view) == rec.data
        lo, hi = sorted((lo % (rec.nbytes + 1), hi % (rec.nbytes + 1)))
        part = view[lo:hi]
        del view
        self.views.append(ViewRec(rec, part, rec.data[lo:hi], mapped=rec.nbytes > 0, pins=rec.nbytes > 0))

    @precondition(lambda self: any(r.arr is not None for r, _ in self.reachable_pages()))
    @rule(i=index)
    @logged
    def take_array(self, i: int) -> None:
        rec, obj = self.pick([(r, o) for r, o in self.reachable_pages() if r.arr is not None], i)
        if rec.released:
            self.expect_error(PageReleasedError, obj.array, "array() of a released page")
            return
        arr = obj.array()
        self.views.append(ViewRec(rec, arr, rec.arr, mapped=True, pins=True))

    @precondition(lambda self: self.views)
    @rule(i=index)
    @logged
    def drop_view(self, i: int) -> None:
        self.views.remove(self.pick(self.views, i))

    # -- releasing, dropping, cycles ------------------------------------------------------------

    @precondition(lambda self: self.reachable_pages())
    @rule(i=index, with_block=st.booleans())
    @logged
    def release(self, i: int, with_block: bool) -> None:
        rec, obj = self.pick(self.reachable_pages(), i)
        if with_block:
            with obj as same:
                assert same is obj
        else:
            assert obj.release() is None
        assert obj.released is True, f"{rec.key}: released is {obj.released!r} after release()"
        if not rec.released:
            rec.released = True
            if not self.caches[rec.gen].cache.closed:
                self.caches[rec.gen].causes["explicit"] += 1

    @precondition(lambda self: self.held)
    @rule(i=index)
    @logged
    def drop_page(self, i: int) -> None:
        rec = self.pick(self.held, i)
        self.held.remove(rec)
        self.drop_ref(rec)

    def cycle_of(
        self, picks: list[tuple[int, bool]], of_builders: list[tuple[int, bool]], resurrect: bool
    ) -> Any:
        """A cycle holding some of the pages and builders the machine refers to directly;
        each either moves into it (the machine lets go of its own reference) or is shared."""
        members: list[Any] = []
        for pool, chosen in ((self.held, picks), (self.builders, of_builders)):
            free = [r for r in pool if r.cycle is None]
            for i, keep in chosen:
                if not free:
                    break
                rec = free.pop(i % len(free))
                members.append(rec)
                if not keep:
                    pool.remove(rec)
        if not members:
            return None
        items = [self.obj_of(r) for r in members]
        cyc = CycleRec((Resurrector if resurrect else Cycle)(items), members, resurrect)
        del items
        for rec in members:
            rec.cycle = cyc
            if rec not in self.held and rec not in self.builders:
                rec.obj = None
        return cyc

    @precondition(lambda self: self.held or self.builders)
    @rule(
        picks=st.lists(st.tuples(index, st.booleans()), min_size=1, max_size=4),
        of_builders=st.lists(st.tuples(index, st.booleans()), max_size=2),
        resurrect=st.booleans(),
    )
    @logged
    def make_cycle(
        self, picks: list[tuple[int, bool]], of_builders: list[tuple[int, bool]], resurrect: bool
    ) -> None:
        """A cycle the machine keeps (to drop, break or share later)."""
        cyc = self.cycle_of(picks, of_builders, resurrect and self.zombies)
        if cyc is not None:
            self.cycles.append(cyc)

    @precondition(lambda self: self.held or self.builders)
    @rule(
        picks=st.lists(st.tuples(index, st.booleans()), min_size=1, max_size=4),
        of_builders=st.lists(st.tuples(index, st.booleans()), max_size=2),
        how=st.sampled_from(["plain", "resurrect", "saveall"]),
    )
    @logged
    def cycle_dies(
        self, picks: list[tuple[int, bool]], of_builders: list[tuple[int, bool]], how: str
    ) -> None:
        """Put pages and builders in a cycle, drop it, collect: in ZombieMachine the cycle
        may resurrect them from its __del__, or the collection may run under
        gc.DEBUG_SAVEALL (then restored, and gc.garbage cleared)."""
        if not self.zombies:
            how = "plain"
        cyc = self.cycle_of(picks, of_builders, how == "resurrect")
        if cyc is not None:
            cyc.obj = None
            self.dropped.append(cyc)
        self.collect(saveall=how == "saveall")

    @precondition(lambda self: self.cycles)
    @rule(i=index)
    @logged
    def drop_cycle(self, i: int) -> None:
        cyc = self.pick(self.cycles, i)
        self.cycles.remove(cyc)
        cyc.obj = None  # unreachable now; only the collector frees it
        self.dropped.append(cyc)

    @precondition(lambda self: self.cycles)
    @rule(i=index)
    @logged
    def break_cycle(self, i: int) -> None:
        """Break it by hand, then drop it: refcount frees it (a Resurrector's __del__ runs
        then too, and hands its items back alive: they were never finalized)."""
        cyc = self.pick(self.cycles, i)
        self.cycles.remove(cyc)
        cyc.obj.me = None
        cyc.obj = None
        back = list(RESURRECTED)
        del RESURRECTED[:]
        if cyc.resurrect:
            for rec, item in zip(cyc.members, back, strict=True):
                assert key_of(item) == rec.key
                if rec.obj is None and not (rec.kind == "builder" and rec.sealed):
                    rec.obj = item  # alive and unreleased: the machine's own again
                    (self.held if rec.kind == "page" else self.builders).append(rec)
                del item
        else:
            assert back == []
        del back
        for rec in cyc.members:
            rec.cycle = None
            if not rec.alive:
                self.died(rec, "refcount")

    @rule()
    @logged
    def gc_collect(self) -> None:
        self.collect()

    @precondition(lambda self: self.zombies)
    @rule()
    @logged
    def gc_collect_saveall(self) -> None:
        self.collect(saveall=True)

    @precondition(lambda self: self.zombies_held)
    @rule(i=index)
    @logged
    def drop_zombie(self, i: int) -> None:
        rec = self.pick(self.zombies_held, i)
        self.zombies_held.remove(rec)
        rec.zombie = None

    @precondition(lambda self: self.zombies_held)
    @rule(i=index)
    @logged
    def poke_zombie(self, i: int) -> None:
        """What a user might do with a resurrected object: release it, seal it."""
        rec = self.pick(self.zombies_held, i)
        if rec.kind == "page":
            assert rec.zombie.release() is None
            assert rec.zombie.released is True, f"resurrected page {rec.key}: released is not True"
        elif rec.sealed:  # the spent builder of a page sealed before its cycle went
            self.expect_error(
                (ValueError, PageReleasedError), rec.zombie.seal, f"seal() of spent builder {rec.key}"
            )
        else:
            closed = self.caches[rec.gen].cache.closed
            err = (PageReleasedError, CacheClosedError) if closed else PageReleasedError
            self.expect_error(err, rec.zombie.seal, f"seal() of resurrected builder {rec.key}")

    # -- remove_released, collect, close --------------------------------------------------------

    @rule()
    @logged
    def remove_released(self) -> None:
        assert self.cache.remove_released() >= 0
        self.flush_model(self.cur.gen)
        if not self.cache.closed:
            self.check_files_exact()

    @rule()
    @logged
    def cache_collect(self) -> None:
        assert self.cache.collect() >= 0
        self.collect_model_after_cache_collect()

    def collect_model_after_cache_collect(self) -> None:
        # cache.collect() ran gc.collect() itself: account for it as a plain collection
        # (nothing was collected since; running another one finds nothing new).
        self.collect()
        self.flush_model(self.cur.gen)
        self.check_files_exact()

    @rule(reopen=st.booleans())
    @logged
    def close(self, reopen: bool) -> None:
        cur = self.cur
        cur.cache.close()
        cur.cache.close()  # idempotent
        assert cur.cache.closed
        assert not cur.path.exists(), f"{cur.path} is still there after close()"
        s = cur.cache.stats()
        assert (s.live_pages, s.live_bytes, s.pending, s.pending_bytes) == (0, 0, 0, 0), s
        for rec in self.pages:
            if rec.gen == cur.gen:
                rec.released = True
                rec.removed = True
        if reopen:
            self.open_cache()
        else:
            self.expect_error(CacheClosedError, lambda: cur.cache.write(b"late"), "write() after close")
            self.open_cache()

    # -- pickles, diagnostics -------------------------------------------------------------------

    @precondition(lambda self: self.reachable_pages())
    @rule(i=index, take_view=st.booleans())
    @logged
    def pickle_page(self, i: int, take_view: bool) -> None:
        rec, obj = self.pick(self.reachable_pages(), i)
        if rec.released:
            self.expect_error(PageReleasedError, lambda: pickle.dumps(obj), "pickle of a released page")
            return
        borrowed = pickle.loads(pickle.dumps(obj))
        assert isinstance(borrowed, BorrowedPage) and borrowed.borrowed
        assert borrowed.read() == rec.data
        if take_view:
            view = borrowed.view()
            assert bytes(view) == rec.data
            # a borrower's view of a page file pins its bytes in the owner's cache too (the
            # view's OFD lock); of a packed page it is a copy
            pins = rec.nbytes > 0 and not rec.packed
            self.views.append(ViewRec(rec, view, rec.data, mapped=rec.nbytes > 0, pins=pins))
            del view
        self.borrows.append(BorrowRec(rec, borrowed))

    @precondition(lambda self: self.borrows)
    @rule(i=index)
    @logged
    def drop_borrowed(self, i: int) -> None:
        self.borrows.remove(self.pick(self.borrows, i))

    @precondition(lambda self: any(r.gen == self.cur.gen for r, _ in self.reachable_pages()))
    @rule(i=index)
    @logged
    def explain(self, i: int) -> None:
        rec, obj = self.pick([(r, o) for r, o in self.reachable_pages() if r.gen == self.cur.gen], i)
        # A diagnostic: it must not raise, whatever the page. (What it says is not checked:
        # it walks gc.get_referrers(), which does not see the objects gc.freeze() moved to
        # the permanent generation, so here it misses most chains.)
        text = self.cache.explain(obj)
        assert isinstance(text, str) and text

    @rule(collect_first=st.booleans())
    @logged
    def live(self, collect_first: bool) -> None:
        if collect_first:
            self.collect()
        got = {key_of(lp.page) for lp in self.cache.live()}
        want = {r.key for r in self.pages if r.gen == self.cur.gen and not r.released}
        assert got == want, f"live(): extra {sorted(got - want)}, missing {sorted(want - got)}"

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def pages_read_back_or_are_inert(self) -> None:
        for rec, obj in self.reachable_pages():
            if not rec.released:
                assert obj.released is False, f"{rec.key} says released"
                got = obj.read()
                assert got == rec.data, f"read() of {rec.key} gave {self.whose(got)}"
                view = obj.view()
                assert bytes(view) == rec.data, f"view() of {rec.key} gave {self.whose(view)}"
                del view
                if rec.arr is not None:
                    arr = obj.array()
                    assert np.array_equal(arr, rec.arr) and arr.dtype == rec.arr.dtype
                    del arr
            else:
                what = f"{'resurrected ' if rec.zombie is not None else ''}released page {rec.key}"
                assert obj.released is True, f"{what}: released is {obj.released!r}"
                self.expect_error(PageReleasedError, obj.read, f"{what}: read()")
                self.expect_error(PageReleasedError, obj.view, f"{what}: view()")
                self.expect_error(PageReleasedError, functools.partial(pickle.dumps, obj), f"{what}: pickle")
                if rec.arr is not None:
                    self.expect_error(PageReleasedError, obj.array, f"{what}: array()")
                assert obj.release() is None
                assert obj.released is True, f"{what}: released is {obj.released!r} after release()"

    @invariant()
    def builders_work_or_are_inert(self) -> None:
        for rec in self.builder_recs:
            if rec.sealed:
                continue
            obj = self.obj_of(rec)
            if obj is None:
                continue
            if rec.zombie is not None:
                what = f"resurrected builder {rec.key}"
                # of a closed cache: that it is closed is as good an answer
                err = (
                    (PageReleasedError, CacheClosedError)
                    if self.caches[rec.gen].cache.closed
                    else PageReleasedError
                )
                self.expect_error(err, obj.view, f"{what}: view()")
                if rec.arr is not None:
                    self.expect_error(err, obj.array, f"{what}: array()")
            elif self.caches[rec.gen].cache.closed:
                self.expect_error(CacheClosedError, obj.view, "view() of a builder of a closed cache")
            else:
                assert not Path(rec.key).exists(), f"unsealed builder {rec.key} has a name"
                view = obj.view()
                if rec.data is not None:
                    assert bytes(view) == bytes(rec.data), f"builder {rec.key}: {self.whose(view)}"
                view.release()
                if rec.arr is not None:
                    arr = obj.array()
                    assert np.array_equal(arr, rec.arr)
                    del arr

    @invariant()
    def views_keep_their_bytes(self) -> None:
        for v in self.views:
            if isinstance(v.view, np.ndarray):
                assert np.array_equal(v.view, v.expect) and v.view.dtype == v.expect.dtype, (
                    f"an array of {v.owner.key} changed"
                )
            else:
                want = bytes(v.owner.data) if v.expect is None else v.expect
                assert bytes(v.view) == want, f"a view of {v.owner.key} now holds {self.whose(v.view)}"

    @invariant()
    def borrowed_pages_follow_their_owner(self) -> None:
        for b in self.borrows:
            owner = b.owner
            if not owner.released:
                assert b.handle.read() == owner.data
            elif owner.removed and not (owner.packed and self.pinned(owner)):
                # (a slot pinned by the owner's view is not freed: it still holds the page)
                self.expect_error(
                    PageLostError, b.handle.read, f"borrowed read of {owner.key}, released and removed"
                )
            else:  # released, file maybe not yet removed: its bytes or PageLostError
                try:
                    got = b.handle.read()
                except PageLostError:
                    continue
                assert got == owner.data, f"borrowed {owner.key} gave {self.whose(got)}"

    @invariant()
    def folder_and_stats_match_the_model(self) -> None:
        cur = self.cur
        mine = [r for r in self.pages if r.gen == cur.gen]
        names = page_files_on_disk(cur.path)
        must = {Path(r.key).name for r in mine if not r.released and not r.packed}
        may = must | {Path(r.key).name for r in mine if r.released and not r.removed and not r.packed}
        assert must <= names, f"files missing for unreleased pages: {sorted(must - names)}"
        assert names <= may, f"files that should be gone: {sorted(names - may)}"
        ids = slot_ids_on_disk(cur.path)
        must_ids = {r.id for r in mine if r.packed and not r.released}
        may_ids = must_ids | {r.id for r in mine if r.packed and (not r.removed or self.pinned(r))}
        assert must_ids <= ids, f"slots missing for unreleased pages: {sorted(must_ids - ids)}"
        assert ids <= may_ids, f"slots that should be free: {sorted(ids - may_ids)}"
        live_pages = [r for r in self.pages if r.gen == cur.gen and not r.released]
        live_builders = [r for r in self.builder_recs if r.gen == cur.gen and r.live]
        s = cur.cache.stats()
        assert s.live_pages == len(live_pages) + len(live_builders), (
            f"stats().live_pages is {s.live_pages}; the machine holds {len(live_pages)} unreleased "
            f"pages and {len(live_builders)} unsealed builders"
        )
        want_bytes = sum(r.nbytes for r in live_pages) + sum(r.nbytes for r in live_builders)
        assert s.live_bytes == want_bytes, f"live_bytes {s.live_bytes}, model {want_bytes}"
        causes = (s.released_by_refcount, s.released_by_gc, s.released_explicitly)
        want = (cur.causes["refcount"], cur.causes["gc"], cur.causes["explicit"])
        assert causes == want, f"releases by (refcount, gc, explicit): stats {causes}, model {want}"
        assert s.remove_errors == 0

    @invariant()
    def fds_are_accounted_for(self) -> None:
        targets = fd_targets()
        allowance = 0
        for rec in self.builder_recs:
            if rec.sealed or not rec.alive:
                continue
            # an unsealed builder object: its own fd and the dup its mmap.mmap keeps (a
            # resurrected one may have closed them, or not yet: a bound, not a count)
            allowance += 2
        allowance += sum(1 for v in self.views if v.owner.kind == "builder")
        # a closed cache's folder fd shows as "<folder> (deleted)"
        folders = {str(c.path) for c in self.caches} | {f"{c.path} (deleted)" for c in self.caches}
        # an open cache keeps an fd on each of its segments
        segments = {str(p) for c in self.caches if not c.cache.closed for p in c.path.glob("*.slots")}
        # the reaper reads /proc/locks for a moment when it removes a pickled page's file, to
        # look for a borrower's view of it (dp_borrow_view)
        targets = [t for t in targets if t != "/proc/locks"]
        files = [t for t in targets if t.startswith(self.root + "/") and t not in folders | segments]
        assert len(files) <= allowance, f"fds on cache files: {files}, allowed {allowance}"
        assert len(targets) <= self.fd_baseline + len(segments) + allowance, (
            f"{len(targets)} fds open, {self.fd_baseline} after the cache opened, {len(segments)} "
            f"for segments, {allowance} for builders"
        )

    @invariant()
    def mappings_are_accounted_for(self) -> None:
        maps = mappings_under(self.root + "/")
        allowance = sum(1 for v in self.views if v.mapped)
        # an open cache maps each of its segments' tags
        allowance += sum(segment_count(c.path) for c in self.caches if not c.cache.closed)
        allowance += sum(
            1
            for r in self.builder_recs
            if not r.sealed and r.alive and r.nbytes > 0 and not (r.finalized and r.zombie is None)
        )
        assert len(maps) <= allowance, (
            f"{len(maps)} mappings of cache files, allowed {allowance}:\n" + "\n".join(maps)
        )

    # -- teardown ---------------------------------------------------------------------------

    def teardown(self) -> None:
        # Hypothesis calls this from a finally: a failure of a step is then in flight, and
        # teardown's own leak checks must not replace it.
        failing = sys.exc_info()[0] is not None
        log_step("state.teardown()")
        problems = []
        try:
            for c in self.caches:
                c.cache.close()
                if c.path.exists():
                    problems.append(f"{c.path} is still there after close()")
            del c  # a loop variable would keep the last cache (and its fds) alive
            self.held = self.builders = self.cycles = self.dropped = []
            self.views = self.borrows = self.zombies_held = []
            for rec in self.pages + self.builder_recs:
                rec.obj = rec.zombie = None
                rec.cycle = None
            self.pages = self.builder_recs = []
            del RESURRECTED[:]
            gc.collect()
            del RESURRECTED[:]
            self.caches = []
            gc.collect()
            fds = fd_targets()
            if len(fds) != self.fd_start:
                problems.append(f"{len(fds)} fds open at teardown, {self.fd_start} at the start: {fds}")
            maps = mappings_under(self.root + "/")
            if maps:
                problems.append(f"mappings left at teardown: {maps}")
            left = os.listdir(self.root)
            if left:
                problems.append(f"left in the root: {left}")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            gc.unfreeze()
            if self.gc_was_enabled:
                gc.enable()
        if problems and not failing:
            raise AssertionError("; ".join(problems))


class ZombieMachine(Machine):
    zombies = True


def test_state_machine() -> None:
    run_state_machine_as_test(Machine, settings=SETTINGS)


def test_zombie_state_machine(tmp_path: Path, packing: str) -> None:
    """Resurrected pages and builders, and DEBUG_SAVEALL: in a child interpreter unless
    DISKPAGES_SM_ZOMBIES=1, so that a crash fails this test rather than the session."""
    mode = os.environ.get(ZOMBIES_ENV, "")
    if mode == "0":
        pytest.skip(f"{ZOMBIES_ENV}=0")
    if mode == "1":
        run_state_machine_as_test(ZombieMachine, settings=settings(SETTINGS, max_examples=20))
        return
    here = Path(__file__).resolve()
    log = tmp_path / "steps.log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{here}::test_zombie_state_machine[{packing}]",
        ],
        cwd=here.parent.parent,
        env={**os.environ, ZOMBIES_ENV: "1", LOG_ENV: str(log)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    if proc.returncode < 0 or "Fatal Python error" in output or "AddressSanitizer" in output:
        # a crash: hypothesis printed nothing; the log has the steps of the example that crashed
        how = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else "crashed"
        steps = log.read_text().splitlines() if log.exists() else []
        starts = [i for i, line in enumerate(steps) if line.startswith("state = ")]
        last = steps[starts[-1] :] if starts else steps
        lines = output.splitlines()
        # what the C side or faulthandler said: from the first report, not pytest's frames
        first = next(
            (i for i, line in enumerate(lines) if "AddressSanitizer" in line or "Fatal Python" in line), 0
        )
        pytest.fail(
            f"the zombie state machine {how} in a child interpreter (exit status {proc.returncode}), "
            "during this example (unshrunk; invariants run after every step; an earlier example may "
            "have corrupted the heap already):\n"
            + "\n".join(last)
            + "\n\nits output:\n"
            + "\n".join(lines[max(0, first - 10) : first + 30]),
            pytrace=False,
        )
    tail = "\n".join(output.splitlines()[-200:])
    pytest.fail(
        f"the zombie state machine failed in a child interpreter (exit status {proc.returncode}):\n{tail}",
        pytrace=False,
    )
