"""A page's file lives exactly as long as the Page: refcount, cycles, threads, exit."""

import gc
import threading
import weakref

import pytest

from diskpages import PageCache, PageReleasedError

from conftest import files_in, on_disk, run_python, wait_until

# Also run under AddressSanitizer by .ci/run (-m lifetime): a page's C record must not be
# touched after it is freed, here or in the child interpreters these tests start. Every
# test runs for pages with files of their own and for packed pages (slots in segments).
pytestmark = [pytest.mark.lifetime, pytest.mark.usefixtures("packing")]


def test_del_releases_and_remove_released_removes(cache):
    page = cache.write(b"abc")
    where = on_disk(page)
    del page
    stats = cache.stats()
    assert (stats.live_pages, stats.pending) == (0, 1)
    assert where.exists()  # max_delay=30 in this fixture: still queued
    assert cache.remove_released() == 1
    assert not where.exists()
    assert cache.stats().removed == 1


def test_removed_without_any_call_within_max_delay(root):
    with PageCache(root, max_delay=0.05) as cache:
        page = cache.write(b"x" * 4096)
        where = on_disk(page)
        del page
        # Liveness, not timing: the reaper removes it with no call from us. The bound is
        # generous for a loaded CI machine; the latency itself (median 35 ms for a
        # max_delay of 50 ms) is measured in benchmarks/test_removal_latency.py.
        assert wait_until(lambda: not where.exists() and cache.stats().removed == 1, timeout=10)


def test_batch_triggers_removal_before_max_delay(root):
    with PageCache(root, batch=8, max_delay=60.0) as cache:
        pages = [cache.write(b"b") for _ in range(8)]
        wheres = [on_disk(p) for p in pages]
        del pages
        assert wait_until(lambda: not any(w.exists() for w in wheres), timeout=10)


def test_finalizer_keeps_nothing_alive(cache):
    page = cache.write(b"abc")
    ref = weakref.ref(page)
    del page
    assert ref() is None


def test_page_in_unreachable_cycle_waits_for_collector(cache):
    gc.disable()
    try:
        holder: list = []
        holder.append(holder)
        holder.append(cache.write(b"cyclic"))
        where = on_disk(holder[1])
        del holder
        cache.remove_released()
        assert where.exists(), "removed while the cycle was not yet collected"
        assert cache.stats().live_pages == 1
        cache.collect()  # the collection wakes the reaper too: either may remove it
        assert not where.exists()
        assert cache.stats().removed == 1
    finally:
        gc.enable()


def test_collect_returns_the_pages_its_collection_released(cache, no_gc):
    # Its count is the collection's releases, whoever removes their files: the collection
    # wakes the reaper, which may remove them before collect() itself gets to.
    for _ in range(3):
        for _ in range(3):
            cache.write(b"gone before").release()  # pending, but not the collection's
        for _ in range(2):
            holder: list = []
            holder.append(holder)
            holder.append(cache.write(b"cyclic"))
            del holder
        assert cache.collect() == 2
        assert cache.stats().pending == 0
    assert cache.collect() == 0


def test_flush_is_a_deprecated_alias_of_remove_released(cache):
    cache.write(b"x").release()
    with pytest.warns(DeprecationWarning, match=r"flush\(\) is deprecated: call remove_released\(\)"):
        assert cache.flush() == 1
    assert cache.stats().pending == 0


def test_reachable_cycle_is_not_removed(cache):
    holder: list = []
    holder.append(holder)
    holder.append(cache.write(b"kept"))
    cache.collect()
    assert holder[1].read() == b"kept"


def test_release_from_another_thread_and_inside_gc(cache):
    page = cache.write(b"t")
    t = threading.Thread(target=page.release)
    t.start()
    t.join()
    assert page.released
    with pytest.raises(PageReleasedError):
        page.read()

    class ReleasesInFinalizer:
        def __init__(self, p):
            self.p = p
            self.me = self  # a cycle: only the collector frees it

        def __del__(self):
            self.p.release()

    victim = cache.write(b"v")
    ReleasesInFinalizer(victim)
    gc.collect()
    assert victim.released


def test_exit_removes_everything_quietly(root):
    proc = run_python(f"""
        import gc, threading
        from diskpages import PageCache
        cache = PageCache({str(root)!r})
        kept = [cache.write(b"g" * 100) for _ in range(50)]          # referenced from globals
        for _ in range(200):                                        # pages in cycles
            a = [cache.write(b"c")]; a.append(a)
        ring = {{"cache": cache}}; ring["self"] = ring                # the cache in a cycle too
        view = kept[0].view()                                       # a live mapping
        builder = cache.allocate(1000); bview = builder.view()      # unsealed builder
        other = PageCache({str(root)!r}, sync="full")
        other.write(b"o")
        lonely = PageCache({str(root)!r})
        lonely_page = lonely.write(b"l")
        del lonely                                                  # kept alive by its page
        threading.Thread(target=lambda: cache.write(b"thread")).start()
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert proc.stderr == ""
    assert files_in(root) == []


def test_finalizers_need_no_module_globals(root):
    # At shutdown a page's __del__ may run after diskpages' own module globals were set to
    # None. Do that to the modules by hand, then drop pages and builders: any use of a
    # global in their finalizers would print "Exception ignored ..." on stderr.
    proc = run_python(f"""
        import gc, sys
        from diskpages import PageCache
        cache = PageCache({str(root)!r})
        pages = [cache.write(b"m" * 10) for _ in range(100)]
        cyclic = [cache.write(b"c")]; cyclic.append(cyclic)
        builder = cache.allocate(16)
        saved = {{}}
        for name in (
            "diskpages._cache", "diskpages._pages", "diskpages._views", "diskpages._budget",
            "diskpages._finalize", "diskpages._bindings", "diskpages",
        ):
            module = sys.modules[name]
            saved[name] = dict(vars(module))
            for key in saved[name]:
                if not key.startswith("__"):
                    setattr(module, key, None)
        del pages, cyclic, builder
        gc.collect()
        print("dropped")
        # the cache's own finalizer runs from atexit, which CPython runs before it tears
        # modules down: give the globals back for that, as the interpreter would
        for name, values in saved.items():
            vars(sys.modules[name]).update(values)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "dropped\n"
    assert proc.stderr == ""
    assert files_in(root) == []


NO_CRASH = """
    import gc
    from diskpages import PageCache
    cache = PageCache({root!r})
    page = cache.write(b"survivor" * 1000)
    view = page.view()
    part = view[8:16]
    b = cache.allocate(16); bview = b.view(); bview[:5] = b"build"; del b
    page.release(); cache.remove_released()
    assert bytes(part) == b"survivor", "after release"
    cache.close()
    assert bytes(view[:8]) == b"survivor", "after close"
    del page, cache; gc.collect()
    assert bytes(view[-8:]) == b"survivor", "after the cache is gone"
    assert bytes(bview[:5]) == b"build", "builder view after drop and close"
    try:
        view[0] = 1
    except TypeError:
        print("read-only")
    try:
        view.obj[0:1] = b"x"
    except TypeError:
        print("read-only underneath too")
    del view
    assert bytes(part) == b"survivor"
    del part
    print("ok")
"""


def test_views_outlive_release_flush_close_without_crashing(root):
    proc = run_python(NO_CRASH.format(root=str(root)))
    assert proc.returncode == 0, proc.stderr  # a segfault is -11
    assert proc.stdout.splitlines() == ["read-only", "read-only underneath too", "ok"]
    assert proc.stderr == ""
    assert files_in(root) == []


def test_unsealed_builder_at_exit(root):
    proc = run_python(f"""
        from diskpages import PageCache
        c = PageCache({str(root)!r})
        b = c.allocate(1 << 20)
        v = b.view(); v[:3] = b"abc"
    """)
    assert proc.returncode == 0 and proc.stderr == ""
    assert files_in(root) == []


def test_gc_disabled_program_still_cleans_at_exit(root):
    proc = run_python(f"""
        import gc; gc.disable()
        from diskpages import PageCache
        c = PageCache({str(root)!r})
        for _ in range(500):
            a = [c.write(b"x" * 64)]; a.append(a)
        import os; from diskpages._folders import _contents
        fd = os.open(c.path, os.O_RDONLY); assert _contents(fd)[0] == 500; os.close(fd)
    """)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert files_in(root) == []


FORK = """
    import os, sys, warnings
    from diskpages import CacheClosedError, PageCache
    warnings.filterwarnings("ignore", "This process", DeprecationWarning)  # 3.12+: fork beside the reaper

    cache = PageCache({root!r})
    empty = PageCache({root!r})          # no page: its folder could be rmdir'ed by mistake
    page = cache.write(b"parent's")
    builder = cache.allocate(4096)
    builder.view()[:2] = b"ok"
    pid = os.fork()
    if pid == 0:
        # the child: everything that would remove files must leave the parent's alone
        for call in (lambda: cache.write(b"child"), lambda: cache.write_many([b"c"]),
                     lambda: cache.allocate(8), builder.seal):
            try:
                call()
                sys.exit("a forked child wrote into its parent's cache")
            except CacheClosedError:
                pass
        assert len(builder.view()) == 4096, "a refused seal must leave the builder usable"
        page.release()
        del page, builder
        cache.remove_released(); cache.collect(); cache.close(); empty.close()
        sys.exit(0)                      # a normal exit: atexit and finalizers run
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert page.read() == b"parent's"
    assert empty.path.exists() and cache.path.exists()
    sealed = builder.seal()
    assert sealed.read()[:2] == b"ok"
    second = cache.write(b"2")           # the child took none of our ids
    print("parent ok")
"""


def test_forked_child_never_removes_or_writes_parents_pages(root):
    proc = run_python(FORK.format(root=str(root)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "parent ok\n"
    assert proc.stderr == ""
    assert files_in(root) == []  # and the parent itself cleaned up at its exit
