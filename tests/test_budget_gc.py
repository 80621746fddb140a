"""The disk budget, removal after a collection, release accounting by cause and
warn_on_gc: for pages with files of their own and for packed pages alike (the `packing`
fixture)."""

import gc
import os
import threading
import time
import warnings

import pytest

from diskpages import CacheFullError, PageCache, PageCacheError

from conftest import (
    HeldCollection,
    files_in,
    packing_irrelevant,
    page_count_on_disk,
    pages_and_bytes_on_disk,
    run_python,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("packing")

MiB = 1 << 20


def folder_bytes(cache):
    """The bytes of the pages in the folder: page files, and the slots that hold a page."""
    return pages_and_bytes_on_disk(cache)[1]


def cyclic(cache, data):
    """A page that dies only when the cycle collector runs."""
    a = [cache.write(data)]
    a.append(a)


# -- 1. budget -----------------------------------------------------------------------------


def test_budget_holds_when_every_page_dies_in_a_cycle_with_gc_disabled(root, no_gc):
    page = 64 * 1024
    with PageCache(root, max_bytes=MiB, max_delay=3600, batch=2**31 - 1) as cache:
        peak = 0
        for _ in range(6 * MiB // page):
            cyclic(cache, b"c" * page)  # succeeds: the write collects and removes first
            peak = max(peak, folder_bytes(cache))
            s = cache.stats()
            assert s.live_bytes + s.pending_bytes <= MiB
        assert peak <= MiB + page
        assert cache.stats().written == 6 * MiB // page
        assert cache.stats().released_by_gc > 0


def test_over_budget_write_raises_and_writes_nothing(root):
    with PageCache(root, max_bytes=10_000) as cache:
        kept = [cache.write(b"k" * 4000), cache.write(b"k" * 4000)]  # 4 KiB on disk each
        before = (pages_and_bytes_on_disk(cache), cache.stats().written)
        full = r"writing 4000 bytes \(4096 on disk.* 8192 bytes on disk are live"
        with pytest.raises(CacheFullError, match=full) as info:
            cache.write(b"x" * 4000)
        assert isinstance(info.value, PageCacheError)
        with pytest.raises(CacheFullError):
            cache.write_many([b"a" * 1000, b"b" * 1500])  # the whole call counts
        with pytest.raises(CacheFullError):
            cache.allocate(2001)
        with pytest.raises(CacheFullError, match="writing 10001 bytes"):
            kept.append(cache.write(b"x" * 10_001))  # bigger than the budget on its own
        assert (pages_and_bytes_on_disk(cache), cache.stats().written) == before
        kept.pop().release()  # room again, once removed: the write removes it itself
        assert cache.write(b"y" * 4000).read() == b"y" * 4000
        assert cache.allocate(2000).seal().nbytes == 2000


def test_a_page_larger_than_max_bytes_says_so_without_collecting(root):
    np = pytest.importorskip("numpy")
    started = []

    def count(phase, info):
        if phase == "start":
            started.append(info)

    with PageCache(root, max_bytes=10_000) as cache:
        kept = cache.write(b"k" * 4000)
        gc.callbacks.append(count)
        try:
            for write in (
                lambda: cache.write(b"x" * 10_001),
                lambda: cache.allocate(10_001),
                lambda: cache.write_array(np.zeros(1250)),  # 10,000 bytes of data, plus the header
                lambda: cache.write_array(np.zeros(2500)[::2]),  # strided: through a builder
            ):
                with pytest.raises(CacheFullError, match=r"writing 10\d\d\d bytes") as info:
                    write()
                assert "this page alone is larger than max_bytes=10000" in str(info.value)
                assert "bytes are live" not in str(info.value)  # what other pages hold is not the matter
            with pytest.raises(CacheFullError, match="these 3 pages together are larger than max_bytes"):
                cache.write_many([b"a" * 4000] * 3)
        finally:
            gc.callbacks.remove(count)
        assert started == []  # no collection: it could not have helped
        assert cache.stats().written == 1 and kept.read() == b"k" * 4000


@packing_irrelevant  # builders and array pages always have files
def test_budget_counts_builders_and_array_pages(root):
    np = pytest.importorskip("numpy")
    with PageCache(root, max_bytes=6000) as cache:
        builder = cache.allocate(1500)  # a 4 KiB block
        with pytest.raises(CacheFullError):
            cache.write_array(np.zeros(100))  # 800 bytes of data plus the .npy header
        with pytest.raises(CacheFullError):
            cache.write_array(np.zeros(200)[::2])  # strided: the same, through a builder
        assert len(files_in(cache.path)) <= 1  # (the builder's file has no name yet)
        del builder  # unsealed: dropped, its bytes go back
        page = cache.write_array(np.zeros(100))
        assert cache.stats().live_bytes == page.nbytes == os.path.getsize(page.path)


def test_budget_under_threads(root):
    limit = 256 * 1024
    cache = PageCache(root, max_bytes=limit, max_delay=0.005)
    errors, over, stop = [], [], threading.Event()

    def watch():
        # Each counter is one atomic load, exact at its instant; their sum is two loads,
        # between which a removal and a write can both fall, so it is checked when still
        # (and single-threaded, against the folder, in the test above). The charge itself
        # cannot pass the limit: it is a compare-and-swap that refuses to.
        while not stop.is_set():
            s = cache.stats()
            if s.live_bytes > limit or s.pending_bytes > limit or s.charged_bytes > limit:
                over.append(s)

    def work(cycles):
        # Three threads drop pages by refcount; one leaves them in cycles for the collector
        # that any thread's over-budget write runs. (Were every thread to make cyclic
        # garbage as fast as it can, a write could lose the room it made to the others
        # and rightly raise: the budget is a cap, not a queue.)
        try:
            for i in range(300):
                if cycles:
                    cyclic(cache, b"z" * 3000)
                    time.sleep(0)  # let the others run: a thread making garbage, not a flood
                else:
                    p = cache.write(b"w" * (1000 + i * 37 % 8000))
                    del p
        except Exception as e:
            errors.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=work, args=(i == 0,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    watcher.join()
    assert errors == [] and over == []
    assert cache.stats().written == 1200
    cache.collect()  # the last cyclic pages, then every file: no charge may be left behind
    s = cache.stats()
    assert (s.live_bytes, s.pending_bytes, s.charged_bytes, s.remove_errors) == (0, 0, 0, 0)
    assert page_count_on_disk(cache) == 0
    cache.close()


def test_over_budget_write_waits_out_another_threads_collection(root, no_gc):
    # While one thread's collection runs a slow finalizer, gc.collect() in another thread
    # returns at once, collecting nothing. The write must wait for that collection to end
    # and run its own, which frees this thread's cyclic pages, rather than give up.
    in_finalizer = threading.Event()

    class Slow:
        def __del__(self):
            in_finalizer.set()
            time.sleep(0.3)  # lets other threads run while the collection is under way

    def collect_slowly():
        s = Slow()
        s.me = s
        del s
        gc.collect()

    with PageCache(root, max_bytes=64 * 1024, max_delay=3600, batch=2**31 - 1) as cache:
        other = threading.Thread(target=collect_slowly)
        other.start()
        try:
            assert in_finalizer.wait(10)
            for _ in range(16):  # made after that collection began: it cannot free them
                cyclic(cache, b"c" * 4096)  # the whole budget, held by unreachable cycles
            page = cache.write(b"n" * 4096)
            assert page.read() == b"n" * 4096
        finally:
            other.join()
        assert folder_bytes(cache) <= 64 * 1024
        assert cache.stats().released_by_gc >= 16


def test_over_budget_write_gives_up_when_another_collection_outlasts_the_wait(root, no_gc, monkeypatch):
    # The other thread's collection is stuck in a finalizer past COLLECT_WAIT: the write
    # must raise CacheFullError then, not wait for as long as that collection lasts.
    from diskpages import _budget

    monkeypatch.setattr(_budget, "COLLECT_WAIT", 0.2)

    with PageCache(root, max_bytes=64 * 1024, max_delay=3600, batch=2**31 - 1) as cache:
        other = HeldCollection()
        other.start()
        try:
            for _ in range(16):
                cyclic(cache, b"c" * 4096)  # freed only by a collection that starts later
            with pytest.raises(CacheFullError):
                cache.write(b"n" * 4096)
            gave_up_while_stuck = not other.ended.is_set() and other.thread.is_alive()
        finally:
            other.end()
        assert gave_up_while_stuck
        assert cache.write(b"n" * 4096).read() == b"n" * 4096  # and works once it has ended


def test_over_budget_write_in_a_finalizer_of_its_own_collection_does_not_wait(root, no_gc, monkeypatch):
    # A __del__ that writes during this thread's collection: there is no other collection
    # to wait out, so the write gives up at once rather than poll until a timeout.
    from diskpages import _budget

    sleeps = []
    monkeypatch.setattr(_budget.time, "sleep", sleeps.append)
    refused = []
    with PageCache(root, max_bytes=8192, max_delay=3600) as cache:
        keep = cache.write(b"k" * 8192)  # the budget is full, and stays full

        class Writer:
            def __del__(self):
                try:
                    cache.write(b"x")
                except CacheFullError as e:
                    refused.append(e)

        w = Writer()
        w.me = w
        del w
        gc.collect()
        assert len(refused) == 1 and sleeps == []
        del keep


@packing_irrelevant
def test_bad_budget_arguments(root):
    bad_values = ((0, ValueError), (-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError))
    for bad, exc in bad_values:
        with pytest.raises(exc):
            PageCache(root, max_bytes=bad)
    with pytest.raises(TypeError):
        PageCache(root, warn_on_gc=1)
    assert files_in(root) == []


# -- 2. a collection triggers removal ----------------------------------------------------------


def test_collection_removes_its_pages_right_after_it_ends(root, no_gc):
    # Neither the batch nor the delay would ever drain: only the collection can.
    with PageCache(root, max_delay=3600, batch=2**31 - 1) as cache:
        for _ in range(50):
            cyclic(cache, b"g" * 100)
        cache.write(b"refcount").release()  # pending, but not from a collection
        time.sleep(0.1)
        assert page_count_on_disk(cache) == 51  # nothing drained meanwhile
        gc.collect()
        # The reaper removes a chunk's files, then counts them: wait for both.
        assert wait_until(lambda: page_count_on_disk(cache) == 0 and cache.stats().pending == 0), (
            page_count_on_disk(cache),
            cache.stats(),
        )
        s = cache.stats()
        assert (s.released_by_gc, s.pending, s.removed) == (50, 0, 51)


# -- 3. accounting by cause ---------------------------------------------------------------------


def test_releases_are_counted_by_cause(root, no_gc):
    cache = PageCache(root)
    a = cache.write(b"a")
    del a  # refcount
    for _ in range(3):
        cyclic(cache, b"c")
    gc.collect()  # gc
    cache.write(b"r").release()  # explicit
    with cache.write(b"w"):
        pass  # explicit, through the with block
    released_twice = cache.write(b"t")
    released_twice.release()
    del released_twice  # already released: not counted again
    live = [cache.write(b"l") for _ in range(4)]
    s = cache.stats()
    causes = (s.released_by_refcount, s.released_by_gc, s.released_explicitly, s.released_at_close)
    assert causes == (1, 3, 3, 0)
    assert s.released == s.written - s.live_pages == 7
    cache.close()
    s = cache.stats()
    assert s.released_at_close == 4 and s.released == s.written == 11
    assert (s.live_pages, s.pending, s.pending_bytes) == (0, 0, 0)
    del live  # after close: still counted once, at close
    s = cache.stats()
    assert s.released_at_close == 4 and s.released == 11 and s.pending == 0


def test_a_drop_in_another_thread_during_a_collection_counts_as_refcount(root, no_gc):
    # The collection's finalizers run in its own thread; another thread runs meanwhile
    # whenever the collection lets go of the GIL, and what it drops, refcount freed.
    in_finalizer, dropped = threading.Event(), threading.Event()

    class Slow:
        def __del__(self):
            in_finalizer.set()
            dropped.wait(10)  # the collection stays under way until the other thread is done

    def collect_slowly():
        s = Slow()
        s.me = s
        del s
        gc.collect()

    with PageCache(root, warn_on_gc=True) as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = cache.write(b"r")
        other = threading.Thread(target=collect_slowly)
        other.start()
        try:
            assert in_finalizer.wait(10)
            del page  # by refcount, in this thread, while the other thread collects
        finally:
            dropped.set()
            other.join()
        s = cache.stats()
        assert (s.released_by_refcount, s.released_by_gc) == (1, 0)
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# -- 4. warn_on_gc --------------------------------------------------------------------------------


def test_warn_on_gc_names_pages_the_collector_reclaims(root, no_gc):
    with PageCache(root, warn_on_gc=True) as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cyclic(cache, b"x" * 123)
        plain = cache.write(b"y")
        del plain  # refcount: silent
        released = [cache.write(b"z")]
        released.append(released)
        released[0].release()  # released, then collected: silent
        del released
        gc.collect()
    messages = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert messages == [
        "page 1 (123 bytes) was reclaimed by the cycle collector, not by refcount or release(): "
        "it was in a reference cycle"
    ]


def test_warning_that_raises_still_releases_the_page(root, no_gc):
    code = f"""
        import gc, sys, warnings
        warnings.simplefilter("error", ResourceWarning)  # -W error: the warning raises
        from diskpages import PageCache
        cache = PageCache({str(root)!r}, warn_on_gc=True, max_bytes=4096)
        for _ in range(5):  # each page fills the budget: each must really be released
            a = [cache.write(b"x" * 100)]
            a.append(a)
            del a
            gc.collect()
        s = cache.stats()
        assert (s.live_pages, s.released_by_gc) == (0, 5), s
        print("ok")
    """
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    assert "ResourceWarning" in proc.stderr  # reported as unraisable, not swallowed


def test_default_is_silent(root, no_gc):
    with PageCache(root) as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cyclic(cache, b"x")
        gc.collect()
    assert caught == []


def test_warn_on_gc_at_exit(root):
    code = f"""
        from diskpages import PageCache
        quiet = PageCache({str(root)!r})
        loud = PageCache({str(root)!r}, warn_on_gc=True)
        keep = [quiet.write(b"q"), loud.write(b"abc"), loud.write(b"de")]
        loud.write(b"dropped")  # refcount: no warning
    """
    proc = run_python(code, env={"PYTHONWARNINGS": "always::ResourceWarning"})
    assert proc.returncode == 0
    lines = [line for line in proc.stderr.splitlines() if "ResourceWarning" in line]
    assert len(lines) == 2, proc.stderr
    assert "page 1 (3 bytes) was still alive when its cache was finalized" in lines[0] + lines[1]
    assert "page 2 (2 bytes)" in lines[0] + lines[1]
    assert files_in(root) == []
