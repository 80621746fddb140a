"""Interrupts at the edges of a cache's life: at every bytecode of the public constructors
and close() (PageCache, diskpages.zict.File, diskpages.dask.SpillBuffer), an exception
raised there leaves no descriptor, no cache folder and no thread, comes out as itself, and
touches no descriptor the process already holds; a close() interrupted anywhere can be
called again and finishes the job. And the collector's callback, interrupted, leaves no
thread marked as collecting."""

import gc
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from diskpages import PageCache

from conftest import HeldCollection, Interrupt, interrupted_at, wait_until, warm_up_tracer

pytestmark = pytest.mark.lifetime
warm_up_tracer()


def fd_table() -> dict[str, str]:
    """Every descriptor of the process and what it is open on."""
    table = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            table[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own, closed by now
            pass
    return table


def threads() -> int:
    """Threads of this process, C ones included, less the kernel's io_uring workers
    (iou-wrk-*), which exit on their own a little after their ring is closed."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += not f.read().startswith("iou-")
        except FileNotFoundError:
            pass
    return count


def cache_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def steady(before_fds, before_threads, root: Path, keep: list[str], collect: bool = True) -> None:
    """What an interrupted call must leave: the descriptors as they were, no new cache
    folder (``keep``: those there before), no thread. ``collect``: a traceback's frames are
    gone by now; a collection only in case one sat in a cycle (not: nothing may wait for
    the collector)."""
    if fd_table() != before_fds or threads() != before_threads or cache_folders(root) != keep:
        if collect:
            gc.collect()
        wait_until(lambda: threads() == before_threads, timeout=5)
    assert fd_table() == before_fds
    assert threads() == before_threads
    assert cache_folders(root) == keep


def no_cache_left(before_threads, root: Path, keep: list[str]) -> None:
    """While an interrupted constructor's exception is still kept: no cache (folder,
    reaper thread) is left open. (A descriptor it had open, a root's, may stay with the
    traceback's frames until the exception goes: steady() checks it then. Checked with
    real signals: a tracer can also raise on a function's last instruction, where no
    handler of the function's own can catch it and no signal handler ever runs.)"""
    wait_until(lambda: threads() == before_threads, timeout=5)
    assert threads() == before_threads
    assert cache_folders(root) == keep


def make_victim(tmp_path: Path) -> Path:
    """A folder of the user's, with files, unrelated to any cache."""
    victim = tmp_path / "victim"
    victim.mkdir(exist_ok=True)
    for i in range(3):
        (victim / f"keep-{i}").write_bytes(b"mine")
    return victim


def constructors(tmp_path: Path):
    root = tmp_path / "root"
    made = {"PageCache": lambda: PageCache(root, max_delay=3600)}
    try:
        from diskpages.zict import File

        made["zict.File"] = lambda: File(root)
    except ImportError:
        pass
    try:
        from diskpages.dask import SpillBuffer

        made["dask.SpillBuffer"] = lambda: SpillBuffer(str(root), target=1 << 20)
    except ImportError:
        pass
    return root, made


def close_of(obj) -> None:
    obj.close()


@pytest.fixture(params=["PageCache", "zict.File", "dask.SpillBuffer"])
def maker(request, tmp_path):
    """(which, make, root, keep, fds, threads): a constructor, warmed up (first-use
    imports, the root made), and what the process held then."""
    root, made = constructors(tmp_path)
    if request.param not in made:
        pytest.skip(f"{request.param} needs its library")
    make = made[request.param]
    close_of(make())
    gc.collect()
    return request.param, make, root, cache_folders(root), fd_table(), threads()


def test_an_interrupt_at_every_bytecode_of_a_constructor_leaves_nothing(tmp_path, maker, no_gc):
    which, make, root, keep, before_fds, before_threads = maker
    victim = make_victim(tmp_path)
    k = 1
    while True:
        obj, exc = interrupted_at(make, k)
        if exc is None:
            break
        assert isinstance(exc, Interrupt), f"{which}, opcode {k}: {exc!r} instead of the interrupt"
        # The traceback still holds the constructor's frames. An fd the constructor let go
        # of is the next one open() returns: had C kept a number it does not own, letting
        # go of the cache (with the traceback, next line) would empty this folder.
        victim_fd = os.open(victim, os.O_RDONLY | os.O_DIRECTORY)
        del exc
        os.close(victim_fd)
        steady(before_fds, before_threads, root, keep)
        assert sorted(os.listdir(victim)) == ["keep-0", "keep-1", "keep-2"], f"{which}, opcode {k}"
        k += 1
        assert k < 3000, "the constructor never completed"
    assert k > 20, f"{which}: only {k} opcodes: the tracer did not reach diskpages' code"
    close_of(obj)
    del obj
    steady(before_fds, before_threads, root, keep)


def closed(obj) -> bool:
    cache = obj if isinstance(obj, PageCache) else getattr(obj, "file", obj).cache
    return cache.closed and not cache.path.exists()


def test_a_close_interrupted_at_any_bytecode_can_be_called_again_and_finishes(maker):
    which, make, root, keep, before_fds, before_threads = maker
    k = 1
    while True:
        obj = make()
        page = obj.write(b"p" * 5000) if which == "PageCache" else obj.__setitem__("x", b"v" * 5000)
        _, exc = interrupted_at(lambda: close_of(obj), k)  # noqa: B023 - called at once
        done = exc is None
        assert done or isinstance(exc, Interrupt), f"{which}, opcode {k}: {exc!r}"
        del exc
        close_of(obj)  # again: finishes the job, whatever the first one did
        assert closed(obj), f"{which}, interrupted at opcode {k}: the second close() did not close"
        del obj, page
        steady(before_fds, before_threads, root, keep)
        if done:
            break
        k += 1
        assert k < 3000, "close() never completed"
    assert k > 5, f"{which}: only {k} opcodes: the tracer did not reach diskpages' code"


def test_a_signal_storm_over_constructors_and_close_leaves_nothing(tmp_path, no_gc):
    """A real signal handler raising KeyboardInterrupt every 0.3 ms while caches, zict
    Files and SpillBuffers are made, written and closed, for a second each, with no
    collection: an interrupted constructor leaves no cache open even while its exception
    is kept, and nothing at all once it is dropped."""
    root, made = constructors(tmp_path)
    victim = make_victim(tmp_path)
    for make in made.values():
        close_of(make())
    gc.collect()
    keep = cache_folders(root)
    before_fds, before_threads = fd_table(), threads()
    armed = False
    interrupted = completed = constructor_interrupts = 0

    def handler(signum, frame):
        nonlocal armed
        if armed:
            armed = False
            raise KeyboardInterrupt

    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda info: None  # an interrupt in a finalizer: ignored, counted nowhere
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
    try:
        for make in made.values():
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                cache = None
                try:
                    armed = True
                    cache = make()
                    if isinstance(cache, PageCache):
                        cache.write(b"s" * 100)
                    else:
                        cache["s"] = b"s" * 100
                    cache.close()
                    armed = False
                    completed += 1
                except KeyboardInterrupt as e:
                    armed = False
                    interrupted += 1
                    kept = e  # as a REPL (sys.last_value) or a log record keeps it
                    if cache is None:  # the constructor was cut short: it left no cache open
                        no_cache_left(before_threads, root, keep)
                        constructor_interrupts += 1
                    del kept
                finally:
                    armed = False
                if cache is not None:
                    cache.close()  # a close() cut short finishes here
                del cache
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        sys.unraisablehook = old_hook
    assert interrupted > 20 and constructor_interrupts > 5, (interrupted, completed, constructor_interrupts)
    assert sorted(os.listdir(victim)) == ["keep-0", "keep-1", "keep-2"]
    steady(before_fds, before_threads, root, keep, collect=False)


def test_an_interrupted_end_of_collection_leaves_no_thread_marked_collecting(root):
    """A signal handler can raise on the gc callback's first instruction, before it says
    the collection ended. Another thread's collection later must not make this thread's
    drops count as the collector's."""
    from diskpages import _bindings as native

    with PageCache(root, max_delay=3600) as cache:

        def tracer(frame, event, arg):
            code, local = frame.f_code, frame.f_locals
            if event == "call" and code.co_name == "_on_collection" and local["phase"] == "stop":
                raise Interrupt  # before any of the callback's code
            return None

        old_hook = sys.unraisablehook
        sys.unraisablehook = lambda info: None
        sys.settrace(tracer)
        try:
            gc.collect()
        finally:
            sys.settrace(None)
            sys.unraisablehook = old_hook
        # a collection in another thread, while this thread drops a page
        page = cache.write(b"d" * 100)
        other = HeldCollection()
        other.start()
        before = cache.stats()
        del page  # by refcount, in a thread that is not collecting
        after = cache.stats()
        other.end()
        assert after.released_by_refcount == before.released_by_refcount + 1
        assert after.released_by_gc == before.released_by_gc
        assert not native.gc_collecting()
