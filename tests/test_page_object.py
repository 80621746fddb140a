"""A page is one Python object: its hold on the C record, its cache, its id and its size
live in its own storage (PageBase, csrc/pageobj.c), and its death drops the hold in C,
with no Python frame in between."""

import gc
import sys
import tracemalloc
import weakref

import pytest

import diskpages
from diskpages import Page, PageReleasedError

from conftest import wait_until

pytestmark = pytest.mark.usefixtures("packing")


def test_a_page_is_one_object_that_refers_to_its_class_and_cache_only(cache):
    def write():
        pages = cache.write_many([b"x" * 100] * 1000)
        pages.append(cache.write(b"y"))
        pages.append(cache.write_parts([b"a", b"b"]))
        return pages

    write()  # warm: whatever the first calls make once
    gc.collect()
    before = len(gc.get_objects())
    pages = write()
    grew = len(gc.get_objects()) - before
    assert grew <= len(pages) + 2, grew  # the list, and at most one stray object
    for page in pages[-3:]:
        assert sorted(map(id, gc.get_referents(page))) == sorted(map(id, (Page, cache)))


def test_a_page_costs_about_a_hundred_bytes_of_python_memory(cache):
    data = [b"x" * 100] * 2000
    cache.write_many(data)  # warm: the list sizes, the segment
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pages = cache.write_many(data)
        per_page = (tracemalloc.get_traced_memory()[0] - base) / len(pages)
    finally:
        tracemalloc.stop()
    # the object (and its slot in the list): no cdata, no second allocation
    assert per_page < 160, per_page
    assert sys.getsizeof(pages[0]) <= 128


def test_the_id_and_size_are_read_only(cache):
    page = cache.write(b"abc")
    for name in ("id", "nbytes"):
        with pytest.raises(AttributeError):
            setattr(page, name, 7)
    assert (page.id, page.nbytes, len(page)) == (page.id, 3, 3)


def test_death_runs_no_python_code_and_releases_by_refcount(cache):
    page = cache.write(b"p" * 5000)
    ref = weakref.ref(page)
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append((event, frame.f_code.co_name)))
    try:
        del page
    finally:
        sys.setprofile(None)
    assert ref() is None
    assert [c for c in calls if c[0] == "call"] == [], calls
    stats = cache.stats()
    assert (stats.live_pages, stats.released_by_refcount) == (0, 1)


def test_a_page_made_without_its_cache_is_inert():
    for page in (object.__new__(Page), diskpages._bindings.PageBase()):
        assert page.released
        page.release()
        assert (page.id, page.nbytes, len(page)) == (0, 0, 0)
        del page
    with pytest.raises(TypeError):
        Page()


def test_a_page_in_a_cycle_with_its_cache_is_collected(root, no_gc):
    cache = diskpages.PageCache(root, max_delay=0.001)
    folder = cache.path
    page = cache.write(b"c" * 100)
    cache.mine = page  # cache -> page -> cache
    ref = weakref.ref(page)
    del page, cache
    gc.collect()
    assert ref() is None
    wait_until(lambda: not folder.exists())  # the cache's finalizer ran: folder removed


def test_a_released_page_object_says_so_after_the_collector_dropped_it(cache, no_gc):
    """gc.DEBUG_SAVEALL keeps the page object: its storage (the hold) is still its own."""

    class Cycle:
        pass

    holder = Cycle()
    holder.me, holder.page = holder, cache.write(b"s" * 100)
    del holder
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        (page,) = [o for o in gc.garbage if type(o) is Page]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert page.released
    with pytest.raises(PageReleasedError):
        page.read()
    assert cache.stats().released_by_gc == 1


def test_the_makers_refuse_wrong_arguments_and_make_nothing(cache):
    """The private makers (PageBase._write, _write_many, _new) check what they are given:
    a wrong count, no cache hold, buffers not in a list. Nothing is written."""
    with pytest.raises(TypeError, match="expected 5 arguments, got 3"):
        Page._write(cache, cache._address, b"x")
    with pytest.raises(ValueError, match="no cache"):
        Page._write(cache, 0, b"x", 0, False)
    with pytest.raises(ValueError, match="no cache"):
        Page._write_many(cache, 0, [b"x"], 0, False)
    with pytest.raises(TypeError, match="must be a list"):
        Page._write_many(cache, cache._address, (b"x",), 0, False)
    with pytest.raises(TypeError, match="expected 2 arguments, got 1"):
        Page._new(cache)
    stats = cache.stats()
    assert (stats.written, stats.live_pages) == (0, 0)
