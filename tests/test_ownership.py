"""Ownership by reference: no order of finalization, no resurrection, no re-entry and no
thread can make diskpages touch freed C memory, or make one page's file go while another
page still needs it. Each case ends by checking a page of an unrelated, live cache: when
freed memory is reused, that is whose files an unsound model deletes.

CI runs these against an AddressSanitizer build too (the `lifetime` marker), where a
use-after-free that happens to leave the bytes intact still fails. Every test runs for
pages with files of their own and for packed pages (the `packing` fixture)."""

import errno
import gc
import os
import pickle
import threading
import weakref

import pytest

import diskpages
from diskpages import PageCache, PageReleasedError

from conftest import files_in, files_only, on_disk, page_count_on_disk, run_python, wait_until

pytestmark = [pytest.mark.lifetime, pytest.mark.usefixtures("packing")]


@pytest.fixture
def bystander(request, tmp_path):
    """A live cache with live pages, unrelated to the test: its files must survive."""
    request.getfixturevalue("packing")  # made as the test's caches are
    with PageCache(tmp_path / "bystander", max_delay=0.001) as cache:
        pages = [cache.write(bytes([i]) * 1000) for i in range(50)]
        wheres = [on_disk(p) for p in pages]
        yield cache, pages
        cache.remove_released()
        for i, (page, where) in enumerate(zip(pages, wheres, strict=True)):
            assert page.read() == bytes([i]) * 1000, f"a live page of another cache lost {where}"
            assert where.exists(), f"a live page of another cache lost {where}"
        assert page_count_on_disk(cache) == len(pages)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Cycle:
    """An object in a reference cycle, holding whatever it is given."""

    def __init__(self, *held):
        self.held = held
        self.me = self


resurrected: list = []


class Resurrector(Cycle):
    """Its finalizer puts what it holds back into the world."""

    def __del__(self):
        resurrected.append(self.held)


def make_cache_and_cyclic_pages(root, order: str):
    """A cache and its pages in one unreachable cycle: the collector frees them in one
    collection, finalizers in whatever order the lists happen to give."""
    cache = PageCache(root, max_delay=0.001)
    pages = [cache.write(b"p" * 4096) for _ in range(20)]
    if order == "cache first":
        Cycle(cache, *pages)
    else:
        Cycle(*pages, cache)


@pytest.mark.parametrize("order", ["cache first", "pages first"])
def test_a_cache_and_its_pages_die_in_one_collection(tmp_path, bystander, no_gc, order):
    for _i in range(30):
        make_cache_and_cyclic_pages(tmp_path / "root", order)
        gc.collect()
        # freed records of dead caches, if reused, would land in the bystander's memory
        bystander[0].write(b"churn" * 100)
    assert files_in(tmp_path / "root") == []


def test_a_closed_cache_dies_with_its_cyclic_pages(tmp_path, bystander, no_gc):
    """`with PageCache() as cache:` in a function whose pages sit in a cycle: after close,
    only the PageCache holds the C cache."""

    def work():
        with PageCache(tmp_path / "root") as cache:
            Cycle(*[cache.write(b"w" * 100) for _ in range(10)])

    for _ in range(30):
        work()
        gc.collect()
        bystander[0].write(b"churn" * 100)


def test_a_page_outliving_its_cache_object_reads_as_released(root):
    cache = PageCache(root)
    page = cache.write(b"x")
    path = cache.path
    ref = weakref.ref(cache)
    del cache  # the page holds the PageCache: nothing happens
    assert ref() is not None and page.read() == b"x"
    ref().close()
    assert page.released
    with pytest.raises(PageReleasedError):
        page.read()
    del page
    gc.collect()
    assert not path.exists()


@pytest.mark.parametrize("order", ["resurrector first", "page first"])
def test_a_resurrected_page_is_released_and_inert(cache, bystander, no_gc, order):
    resurrected.clear()
    page = cache.write(b"r" * 5000)
    where = on_disk(page)
    held = (page,)
    if order == "resurrector first":
        Resurrector(*held)
    else:
        r = Resurrector()
        r.held = held
        del r
    del page, held
    gc.collect()
    (page,) = resurrected.pop()
    assert page.released
    for call in (page.read, page.view, lambda: pickle.dumps(page)):
        with pytest.raises(PageReleasedError):
            call()
    page.release()  # returns
    assert repr(page).endswith("released>")
    cache.remove_released()
    assert not where.exists()
    bystander[0].remove_released()


def test_pages_kept_by_debug_saveall_are_released_and_inert(cache, bystander, no_gc):
    pages = [cache.write(bytes([i]) * 100) for i in range(20)]
    Cycle(*pages)
    wheres = [on_disk(p) for p in pages]
    del pages
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        kept = [o for o in gc.garbage if type(o) is diskpages.Page]
    finally:
        gc.set_debug(0)
    assert len(kept) == 20
    cache.remove_released()  # the records are removed and freed while the pages live on
    for _ in range(5):  # and their memory reused by other pages
        bystander[0].write(b"reuse" * 100)
    for page in kept:
        assert page.released
        with pytest.raises(PageReleasedError):
            page.read()
        page.release()
    assert not any(w.exists() for w in wheres)
    del kept
    gc.garbage.clear()


def test_a_resurrected_builder_is_inert_and_never_touches_another_fd(cache, tmp_path, no_gc):
    resurrected.clear()
    builder = cache.allocate(4096)
    Resurrector(builder)
    del builder
    gc.collect()
    (builder,) = resurrected.pop()
    # the builder's fd number is free now: an unrelated file of the process takes it
    other = open(tmp_path / "unrelated", "wb")
    try:
        for call in (builder.seal, builder.view, builder.array):
            with pytest.raises(PageReleasedError):
                call()
        os.fstat(other.fileno())  # still open: nothing closed it
        other.write(b"still mine")
    finally:
        other.close()
    assert (tmp_path / "unrelated").read_bytes() == b"still mine"
    cache.remove_released()
    assert files_in(cache.path) == []


def test_a_resurrected_cache_is_closed_and_its_pages_released(root, no_gc):
    resurrected.clear()
    cache = PageCache(root)
    path = cache.path
    Resurrector(cache, cache.write(b"c"))
    del cache
    gc.collect()
    cache, page = resurrected.pop()
    assert cache.closed
    assert page.released
    with pytest.raises(PageReleasedError):
        page.read()
    with pytest.raises(diskpages.CacheClosedError):
        cache.write(b"no")
    assert cache.remove_released() == 0 and cache.stats().live_pages == 0
    cache.close()
    assert not path.exists()


def test_after_the_exit_finalizer_a_cache_says_closed_and_pages_released(root):
    proc = run_python(f"""
        import atexit
        from diskpages import PageCache, PageReleasedError

        def after():  # registered first, so it runs after the cache's exit finalizer
            assert cache.closed, "closed after the exit finalizer"
            try:
                page.read()
            except PageReleasedError:
                print("released")
            assert page.released

        atexit.register(after)
        cache = PageCache({str(root)!r})
        page = cache.write(b"x")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "released" and proc.stderr == ""
    assert files_in(root) == []


def test_a_cache_held_only_by_cyclic_pages_at_exit(root):
    proc = run_python(f"""
        from diskpages import PageCache

        class Cycle:
            def __init__(self, *held):
                self.held, self.me = held, self

        def make():
            cache = PageCache({str(root)!r})
            Cycle(cache, *[cache.write(b"e" * 100) for _ in range(1000)])

        make()
        make()
    """)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert files_in(root) == []


def collects_first(monkeypatch, module, name):
    """Make module.name run a full collection before it does its work: a finalizer then
    runs inside the diskpages call that uses it, deterministically."""
    real = getattr(module, name)

    def collecting(*args, **kwargs):
        gc.collect()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, collecting)


def run_with_timeout(fn, timeout=20):
    """fn() in a daemon thread: (its result or exception), or fail if it hangs."""
    out = []
    t = threading.Thread(target=lambda: out.append(_call(fn)), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"{fn.__name__} deadlocked"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _call(fn):
    try:
        return fn()
    except BaseException as e:
        return e


def test_close_called_from_a_finalizer_inside_close_returns(root, monkeypatch, no_gc):
    """A __del__ that calls close(), run by a collection inside close() itself."""
    import diskpages._cache as cache_module

    cache = PageCache(root)
    cache.write(b"x")
    seen = []

    class Closer(Cycle):
        def __del__(self):
            seen.append(cache._closing)
            cache.close()
            seen.append("returned")

    Closer()
    collects_first(monkeypatch, cache_module, "_shutdown")
    run_with_timeout(cache.close)
    assert seen == [True, "returned"], seen
    assert cache.closed and not cache.path.exists()


def test_seal_called_from_a_finalizer_inside_seal_raises(cache, monkeypatch, no_gc):
    from diskpages import _bindings

    builder = cache.allocate(100)
    errors = []

    class Sealer(Cycle):
        def __del__(self):
            try:
                builder.seal()
            except RuntimeError as e:
                errors.append(e)

    Sealer()
    collects_first(monkeypatch, _bindings, "seal")
    page = run_with_timeout(builder.seal)
    assert len(errors) == 1 and "finalizer" in str(errors[0])
    assert page.read() == bytes(100)


def test_remove_released_called_from_a_finalizer_inside_it_returns(cache, monkeypatch, no_gc):
    from diskpages import _bindings

    flushed = []

    class Flusher(Cycle):
        def __del__(self):
            flushed.append(cache.remove_released())

    cache.write(b"x").release()
    Flusher()
    collects_first(monkeypatch, _bindings, "flush")
    run_with_timeout(cache.remove_released)
    assert len(flushed) == 1 and cache.stats().pending == 0


def test_close_releases_every_descriptor_it_owns(root):
    gc.collect()
    before = fds()
    cache = PageCache(root)
    pages = [cache.write(b"x") for _ in range(5)]
    builder = cache.allocate(10)
    assert fds() > before
    del builder  # (its fd is its own, until it goes)
    gc.collect()
    cache.close()
    assert fds() == before, "close() left the folder's fd or the io_uring fd open"
    assert all(p.released for p in pages)


def test_close_and_sweep_in_a_thread_with_a_32_kib_stack(root):
    proc = run_python(f"""
        import os, threading, diskpages
        from diskpages import PageCache
        errors = []

        def work():
            try:
                cache = PageCache({str(root)!r})
                pages = [cache.write(b"s" * 10) for _ in range(600)]
                for i in range(300):  # names as long as a folder can hold
                    open(os.path.join(cache.path, "n" * 200 + str(i)), "w").close()
                cache.remove_released()
                cache.close()
                diskpages.sweep({str(root)!r})
            except BaseException as e:
                errors.append(e)

        threading.stack_size(32768)
        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert not errors, errors
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_write_many_refuses_sizes_whose_sum_wraps(cache):
    """Two buffers of 2**63 bytes sum to 0 in 64 bits: charged as nothing, the write would
    fill the disk. Called at the C level, as no Python buffer can be that large."""
    from diskpages._native import ffi, lib

    sizes = ffi.new("size_t[]", [2**63, 2**63, 5])
    data = ffi.new("void *[]", [ffi.NULL, ffi.NULL, ffi.NULL])
    holds = ffi.new("dp_hold[]", 3)
    ids = ffi.new("uint64_t[]", 3)
    failed_at = ffi.new("size_t *")
    pointers = ffi.new("dp_hold *[]", [holds + i for i in range(3)])
    rc = lib.dp_write_many(cache._handle, data, sizes, 3, 0, pointers, ids, failed_at)
    assert rc == -errno.EOVERFLOW
    assert all(holds[i].ptr == ffi.NULL for i in range(3))
    assert cache.stats().charged_bytes == 0 and files_in(cache.path) == []
    parts = ffi.new("size_t[]", [2**62, 2**62, 2**62, 2**62])
    rc = lib.dp_write_parts(cache._handle, ffi.new("void *[]", 4), parts, 4, 1, holds, ids)
    assert rc == -errno.EOVERFLOW


@files_only  # about linkat naming a file through /proc; a packed page gets no name
def test_a_thread_with_its_own_fd_table_names_its_own_file(root, tmp_path):
    """/proc/self/fd is the thread-group leader's table: after unshare(CLONE_FILES) a
    thread's fd N there can be another file, which the page's name would then be given to."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_FILES = 0x400
    (tmp_path / "decoy").write_bytes(b"not the page")
    with PageCache(root, pack_max=0) as cache:
        decoy = os.open(tmp_path / "decoy", os.O_RDONLY)  # the lowest free number
        result = []

        def in_own_table():
            if libc.unshare(CLONE_FILES) != 0:
                result.append(OSError(ctypes.get_errno(), "unshare"))
                return
            os.close(decoy)  # in our copy only: the page's nameless file takes its number
            try:
                result.append(cache.write(b"the page"))
            except BaseException as e:
                result.append(e)

        t = threading.Thread(target=in_own_table)
        t.start()
        t.join()
        os.close(decoy)
        if isinstance(result[0], OSError) and result[0].strerror == "unshare":
            pytest.skip(f"unshare(CLONE_FILES) refused: {result[0]}")
        page = result[0]
        assert isinstance(page, diskpages.Page), page
        assert page.read() == b"the page"
        assert (tmp_path / "decoy").read_bytes() == b"not the page"


def test_pages_found_by_live_while_another_thread_finalizes_them(root, bystander):
    """live() hands out pages that another thread's collection may be finalizing: calls on
    them race the finalizer. Each either works or says released, and nothing else moves."""
    with PageCache(root, max_delay=0.001) as cache:
        stop = threading.Event()
        errors = []

        def churn():  # pages that die in cycles, collected whenever gc runs
            while not stop.is_set():
                Cycle(*[cache.write(b"z" * 64) for _ in range(20)])

        def watch():
            while not stop.is_set():
                for item in list(cache.live()):
                    try:
                        assert item.page.read() == b"z" * 64
                    except PageReleasedError:
                        pass
                    except BaseException as e:
                        errors.append(e)

        threads = [threading.Thread(target=churn), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        stop.wait(1.5)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        gc.collect()
        assert wait_until(lambda: cache.remove_released() >= 0 and page_count_on_disk(cache) == 0)


def test_forked_child_with_cyclic_pages_and_cache_dying_together(root):
    proc = run_python(f"""
        import gc, os, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        from diskpages import PageCache

        class Cycle:
            def __init__(self, *held):
                self.held, self.me = held, self

        cache = PageCache({str(root)!r})
        keep = cache.write(b"parent's")
        Cycle(cache.write(b"c"), cache.write(b"d"))
        pid = os.fork()
        if pid == 0:
            child = PageCache({str(root)!r})
            Cycle(child, *[child.write(b"k") for _ in range(50)])
            gc.collect()
            del child
            gc.collect()
            os._exit(0 if keep.read() == b"parent's" else 3)
        _, status = os.waitpid(pid, 0)
        gc.collect()
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert keep.read() == b"parent's"
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert files_in(root) == []


def test_budget_is_met_under_threads_whose_pages_die_in_cycles(root):
    """While the reachable bytes stay well under max_bytes, no write raises CacheFullError,
    however the threads' garbage and collections interleave."""
    page_size = 64 << 10
    threads, writes, keep = 4, 400, 4  # at most threads * keep pages reachable: 1 MiB
    errors: list[BaseException] = []
    with PageCache(root, max_bytes=8 << 20, max_delay=0.01) as cache:

        def worker():
            recent = []
            try:
                for _ in range(writes):
                    page = cache.write(b"b" * page_size)
                    Cycle(page)  # every page dies in a cycle
                    recent = [page, *recent[: keep - 1]]
            except BaseException as e:
                errors.append(e)

        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, f"{len(errors)} writes failed: {errors[0]}"
        assert cache.stats().charged_bytes <= 8 << 20


def test_a_failing_write_many_never_hands_out_a_record_it_takes_back(root):
    """A heap walker (gc.get_objects(), as live() does) can reach the pages of a
    write_many still under way. If the call then fails, a record one of them was given
    and released would be freed while queued: the holds get records only once all are
    written."""
    proc = run_python(
        f"""
        import gc, resource, threading
        from diskpages import Page, PageCache
        cache = PageCache({str(root)!r}, max_delay=3600)
        limit = 1 << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        big = b"B" * (limit + 4096)  # written up to the limit, then EFBIG
        stop = threading.Event()

        def walker():
            while not stop.is_set():
                for o in gc.get_objects():
                    if type(o) is Page and getattr(o, "_cache", None) is cache:
                        o.release()

        t = threading.Thread(target=walker)
        t.start()
        failed = 0
        for _ in range(150):
            try:
                cache.write_many([b"a" * 10, b"b" * 10, big])
            except OSError:
                failed += 1
        stop.set()
        t.join()
        gc.collect()
        cache.remove_released()
        s = cache.stats()
        assert failed == 150, failed
        assert s.live_pages == 0 and s.pending == 0 and s.charged_bytes == 0, s
        print("ok")
    """,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    assert files_in(root) == []


def close_while_the_exit_finalizer_runs(root):
    """One round: three writes in flight, close() in a thread and the cache's finalizer
    here; what the writers got."""
    cache = PageCache(root, sync="data")
    big = b"w" * (8 << 20)
    outcomes = []
    go = threading.Barrier(4)

    def writer():
        go.wait()
        try:
            outcomes.append(cache.write(big))
        except diskpages.CacheClosedError:
            outcomes.append("closed")
        except BaseException as e:
            outcomes.append(e)

    writers = [threading.Thread(target=writer) for _ in range(3)]
    for w in writers:
        w.start()
    go.wait()
    closer = threading.Thread(target=cache.close)
    closer.start()
    cache._finalizer()  # what weakref.finalize's atexit hook calls
    for t in [*writers, closer]:
        t.join()
    assert not cache.path.exists()
    return outcomes


def test_close_and_the_exit_finalizer_racing_wait_for_each_other(root):
    """close() in one thread, the cache's finalizer (what the atexit hook runs) in
    another, with writes in flight: the second must wait for the first, not empty the
    folder and close its fd under the writers."""
    for _ in range(5):
        outcomes = close_while_the_exit_finalizer_runs(root)
        odd = [o for o in outcomes if not (o == "closed" or isinstance(o, diskpages.Page))]
        assert not odd, odd
        assert all(o.released for o in outcomes if isinstance(o, diskpages.Page))
