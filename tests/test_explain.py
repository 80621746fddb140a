"""The "why is this page alive?" diagnostics: cache.explain(page) and cache.live()."""

import re
import sys
import threading
import time

import pytest

from diskpages import PageCache

from conftest import on_disk

REGISTRY = {}


class Holder:
    def __init__(self, page):
        self.page = page


def test_explain_names_globals_attributes_locals_and_cycles(cache, no_gc):
    REGISTRY["cols"] = [None, cache.write(b"global")]
    text = cache.explain(REGISTRY["cols"][1])
    assert f"module {__name__} -> REGISTRY['cols'][1]" in text
    del REGISTRY["cols"]

    holder = Holder(cache.write(b"attr"))
    text = cache.explain(holder.page)  # (inside an assert, pytest would hold it in a local)
    assert "  test_explain_names_globals_attributes_locals_and_cycles() at test_explain.py:" in text
    assert text.rstrip().endswith(" -> holder.page")

    def inner():
        mine = cache.write(b"local")
        return cache.explain(mine)

    assert re.search(r"  inner\(\) at test_explain\.py:\d+ -> mine\n", inner() + "\n")

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
    where = on_disk(page)
    cache.explain(page)
    del page
    cache.remove_released()
    assert not where.exists()


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
    assert f"module {__name__} -> REGISTRY[<BadKey " in text  # its repr raised
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

    # What gc.get_objects() can see while another thread's write is in C, the GIL let go:
    # a Page with its cache and an empty hold (no id, no C record yet). And one made with
    # object.__new__, which has no cache at all.
    bare = object.__new__(diskpages.Page)
    partial = diskpages.Page._new(cache, False)
    page = cache.write(b"p")
    assert [x.page for x in cache.live()] == [page]
    del bare, partial


def _slow_tracer(frame, event, arg):
    # Slow, as a real tracer (coverage, a debugger) may be: the GIL changes hands inside it,
    # and whole explain() calls run while this thread is in it.
    for _ in range(1000):
        pass
    time.sleep(0.02)
    return _slow_tracer


def _traced_loop(outcome, seconds):
    # Module-level functions and arguments, not closures: a closure's cell is shared with
    # the test's own frame, and an unbound cell would fail the test in the wrong thread.
    value, turns = "mine", 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        turns += 1
        if value != "mine":
            outcome.append(f"value changed to {value!r}")
    outcome.append(("done", turns))  # not reached if any of our variables came unbound


def _traced_thread(outcome, seconds):
    sys.settrace(_slow_tracer)  # a frame that is already running has no line events: so
    try:  # the loop runs in a function called after this
        _traced_loop(outcome, seconds)
    except BaseException as e:  # UnboundLocalError: explain() unbound our variables
        outcome.append(repr(e))
    finally:
        sys.settrace(None)


def test_explain_leaves_a_traced_threads_locals_alone(cache):
    # Under a Python-level tracer, CPython before 3.13 writes a frame's f_locals dict back
    # into its variables when a trace call returns, if f_locals was read meanwhile, and
    # unbinds every name missing from the dict. An explain() that read and cleared that
    # dict while the thread was in its tracer unbound the thread's variables under it.
    page = cache.write(b"p")
    outcome = []
    thread = threading.Thread(target=_traced_thread, args=(outcome, 1.0))
    try:
        thread.start()
        calls = 0
        while thread.is_alive():
            text = cache.explain(page)
            assert "test_explain_leaves_a_traced_threads_locals_alone() at" in text
            assert text.splitlines()[1].endswith(" -> page")
            assert [x.page for x in cache.live()] == [page]  # live() reads no frame at all
            calls += 1
    finally:
        thread.join()
    assert len(outcome) == 1 and outcome[0][0] == "done", outcome
    assert outcome[0][1] > 0 and calls > 1, (outcome, calls)


def test_explain_counts_what_another_threads_function_holds(cache):
    import weakref

    held = threading.Event()
    done = threading.Event()
    box = []

    def other():
        mine = cache.write(b"t")
        box.append(weakref.ref(mine))
        held.set()
        done.wait()
        del mine

    thread = threading.Thread(target=other)
    thread.start()
    try:
        held.wait()
        text = cache.explain(box[0]())  # (inside an assert, pytest would hold it in a local)
        assert "kept alive by 1 reference(s) it cannot see: a variable of a function running in" in text
        assert "mine" not in text and "other()" not in text  # explain() did not read its frame
        page = box[0]()
        text = cache.explain(page)
        assert "test_explain_counts_what_another_threads_function_holds() at" in text
        assert text.splitlines()[1].endswith(" -> page")
        assert text.splitlines()[-1].startswith("  and 1 reference(s) it cannot see")
        del page
    finally:
        done.set()
        thread.join()
    page = cache.write(b"mine alone")
    assert "cannot see" not in cache.explain(page)


def test_explain_names_every_holder_shortest_first(cache):
    p = cache.write(b"x")
    d = {"k": p}
    lines = cache.explain(p).splitlines()[1:]
    here = r"  test_explain_names_every_holder_shortest_first\(\) at test_explain\.py:\d+ -> "
    assert re.fullmatch(here + "p", lines[0]) and re.fullmatch(here + r"d\['k'\]", lines[1]), lines
    del d

    # More than MAX_CHAINS chains: the shortest of each holder of the page first, so the
    # twelve names of one list do not hide the dict the page is in too
    a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = [p]
    deep = {"k": {"k2": p}}
    lines = cache.explain(p).splitlines()[1:]
    assert len(lines) == 11 and lines[-1] == "  ... and 4 more", lines
    assert re.fullmatch(here + "p", lines[0]) and re.fullmatch(here + r"deep\['k'\]\['k2'\]", lines[-2])
    assert all(re.fullmatch(here + r"a\d+\[0\]", line) for line in lines[1:-2]), lines
    del a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, deep


def test_explain_separates_the_root_from_the_path(cache):
    cols = {"name": cache.write(b"x")}
    text = cache.explain(cols["name"])  # (inside an assert, pytest would hold it in a local)
    here = r"  test_explain_separates_the_root_from_the_path\(\) at test_explain\.py:\d+"
    assert re.fullmatch(here + r" -> cols\['name'\]", text.splitlines()[1]), text
    page = cols.pop("name")
    text = cache.explain(page)
    assert re.fullmatch(here + " -> page", text.splitlines()[1]), text
    REGISTRY["cols"] = [None, page]
    del page
    text = cache.explain(REGISTRY["cols"][1])
    assert f"  module {__name__} -> REGISTRY['cols'][1]" in text.splitlines(), text
    del REGISTRY["cols"]


def test_explain_says_when_it_stopped_looking(cache, monkeypatch):
    from diskpages import _explain

    p = cache.write(b"x")
    held = [[p]]
    monkeypatch.setattr(_explain, "MAX_STEPS", 1)  # the page's own referrers, no further
    lines = cache.explain(p).splitlines()
    assert lines[1].endswith(" -> p") and lines[-1].startswith("  (it stopped looking after 1 objects")
    monkeypatch.setattr(_explain, "MAX_STEPS", 100)
    assert cache.explain(p).splitlines()[-1].endswith(" -> held[0][0]")
    del held
