"""The "why is this page alive?" diagnostics: cache.explain(page) and cache.live()."""

import gc
import time

import pytest

from diskpages import PageCache


@pytest.fixture
def no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


REGISTRY = {}


class Holder:
    def __init__(self, page):
        self.page = page


def test_explain_names_globals_attributes_locals_and_cycles(cache, no_gc):
    REGISTRY["cols"] = [None, cache.write(b"global")]
    text = cache.explain(REGISTRY["cols"][1])
    assert f"global 'REGISTRY' of module {__name__}['cols'][1]" in text
    del REGISTRY["cols"]

    holder = Holder(cache.write(b"attr"))
    text = cache.explain(holder.page)  # (inside an assert, pytest would hold it in a local)
    assert "local 'holder' of test_explain_names_globals_attributes_locals_and_cycles() at" in text
    assert text.rstrip().endswith(".page")

    def inner():
        mine = cache.write(b"local")
        return cache.explain(mine)

    assert "local 'mine' of inner()" in inner()

    a = [cache.write(b"cycle")]
    a.append(a)
    import weakref

    ref = weakref.ref(a[0])
    del a
    text = cache.explain(ref())  # (inside an assert, pytest would hold it in a local)
    assert "reference cycle" in text
    released = cache.write(b"r")
    released.release()
    assert "released" in cache.explain(released)
    with PageCache(cache.path.parent) as other:
        with pytest.raises(ValueError):
            cache.explain(other.write(b"o"))


def test_explain_does_not_keep_the_page_alive(cache):
    page = cache.write(b"p")
    path = page.path
    cache.explain(page)
    del page
    cache.flush()
    assert not path.exists()


def test_explain_leaves_a_locals_dict_someone_holds(cache):
    page = cache.write(b"p")
    namespace = locals()
    assert namespace["page"] is page
    cache.explain(page)
    assert namespace["page"] is page  # not emptied under its holder


class BadKey:
    def __repr__(self):
        raise RuntimeError("no repr")

    def __hash__(self):
        return 1


def test_explain_survives_odd_referrers_and_live_survives_dead_proxies(cache):
    import weakref

    class Thing:
        pass

    proxy = weakref.proxy(Thing())  # dead at once: isinstance(proxy, ...) would raise
    REGISTRY[BadKey()] = cache.write(b"odd")
    text = cache.explain([v for k, v in REGISTRY.items() if isinstance(k, BadKey)][0])
    assert "global 'REGISTRY'" in text and "BadKey" in text  # its repr raised
    assert [p.page for p in cache.live()] == list(REGISTRY.values())
    REGISTRY.clear()
    del proxy


def test_live_lists_live_pages_with_size_and_age(cache):
    a = cache.write(b"a" * 10)
    time.sleep(0.05)
    b = cache.write(b"b" * 20)
    cache.write(b"c").release()
    live = list(cache.live())
    assert [(x.page, x.nbytes) for x in live] == [(a, 10), (b, 20)]
    assert live[0].age >= live[1].age >= 0 and live[0].age >= 0.04


def test_live_skips_a_page_another_thread_is_still_building(cache):
    import diskpages

    class Quiet(diskpages.Page):
        __slots__ = ()

        def __del__(self):  # it has no C record to drop
            pass

    # What gc.get_objects() can see while another thread is in Page._new, between
    # object.__new__ and the last slot: a Page with none, or only some, of its slots set.
    bare = object.__new__(diskpages.Page)
    partial = object.__new__(diskpages.Page)
    partial._cache = cache  # this cache's, but no id, size or C record yet
    try:
        page = cache.write(b"p")
        assert [x.page for x in cache.live()] == [page]
    finally:
        for half in (bare, partial):
            half.__class__ = Quiet  # same layout; Page.__del__ would raise on the missing _rec
        del bare, partial, half
