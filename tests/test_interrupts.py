"""Asynchronous exceptions: a KeyboardInterrupt, or any exception a signal handler raises,
can arrive at any bytecode. Whatever C hands back is owned before the next bytecode runs,
so an interrupt anywhere in a write leaves no file, no live or charged bytes and no fd
without a Page. Checked two ways: deterministically at every bytecode of diskpages' own
Python code (a tracer raises at the k-th opcode, for every k), and with a real signal
handler raising every 0.5 ms for seconds. The write paths that can make packed pages
(write, write_many) run for both kinds of page (the `packing` fixture)."""

import gc
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from diskpages import PageCache

from conftest import Interrupt, interrupted_at, page_count_on_disk, warm_up_tracer

pytestmark = pytest.mark.lifetime
warm_up_tracer()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def allocate_and_seal(cache):
    builder = cache.allocate(3000)
    with builder.view() as view:
        view[:5] = b"hello"
    return builder.seal()


def allocate_array_and_seal(cache):
    builder = cache.allocate_array((10, 3), "f4")
    builder.array()[:] = 1.5
    return builder.seal()


def strided(cache):
    return cache.write_array(np.arange(64, dtype="i8").reshape(8, 8)[:, ::2])


def read_into(cache):
    page = cache.write(b"r" * 5000)
    page.readinto(bytearray(5000))
    return page


def hand_over_and_adopt(cache):
    return cache.adopt(cache.write(b"h" * 5000).hand_over())


OPERATIONS = {
    "write": lambda c: c.write(b"x" * 5000),
    "write_many": lambda c: c.write_many([b"a" * 100, b"b" * 2000, b""]),
    "write_array": lambda c: c.write_array(np.arange(100, dtype="f8")),
    "write_array strided": strided,
    "allocate": lambda c: c.allocate(4096),
    "allocate and seal": allocate_and_seal,
    "allocate_array and seal": allocate_array_and_seal,
    "write_parts": lambda c: c.write_parts([b"a" * 100, b"b" * 3000, b""]),
    "readinto": read_into,
    "hand_over and adopt": hand_over_and_adopt,
}


def run_interrupted_at(op, cache, k: int):
    """Run op(cache), raising Interrupt at the k-th opcode executed in diskpages' code.
    Returns (result, interrupted)."""
    result, exc = interrupted_at(lambda: op(cache), k)
    if exc is None:
        return result, False
    if isinstance(exc, Interrupt):
        return None, True
    raise exc


# write() and write_many() make packed pages or files; the rest always make files
PACKABLE = ("write", "write_many", "write_parts", "readinto", "hand_over and adopt")
CASES = [(p, name) for name in OPERATIONS for p in (("files", "packed") if name in PACKABLE else ("packed",))]


@pytest.mark.parametrize("packing, name", CASES, indirect=["packing"])
def test_an_interrupt_at_every_bytecode_orphans_nothing(root, packing, name):
    op = OPERATIONS[name]
    with PageCache(root, max_delay=3600) as cache:
        op(cache)  # warm up: first-use imports and caches
        gc.collect()
        cache.remove_released()
        start_fds = fds()
        start_live = cache.stats().live_pages
        k, interrupted = 1, True
        while interrupted:
            result, interrupted = run_interrupted_at(op, cache, k)
            if interrupted:
                cache.remove_released()
                s = cache.stats()
                if s.live_pages != start_live or fds() != start_fds:
                    gc.collect()  # (slow, so only if needed) a traceback may sit in a cycle
                    cache.remove_released()
                    s = cache.stats()
                assert s.live_pages == start_live, f"{name}, interrupted at opcode {k}: {s}"
                assert s.charged_bytes == s.live_bytes, f"{name}, opcode {k}: {s}"
                assert fds() == start_fds, f"{name}, interrupted at opcode {k}: an fd leaked"
                k += 1
            assert k < 5000, "the operation never completed"
        assert k > 5, f"{name}: only {k} opcodes: the tracer did not reach diskpages' code"
        # the uninterrupted run made exactly one result, which works
        assert result is not None
        del result
        gc.collect()
        cache.remove_released()
        assert cache.stats().live_pages == start_live
        assert fds() == start_fds


class Interrupter:
    """A signal handler that raises KeyboardInterrupt every ``interval`` seconds, but only
    while armed: inside ``run(op)``, from the call to its return, so that an interrupt can
    land anywhere in the library, and the test's own loop never sees one. The handler
    disarms before it raises: one interrupt per call at most."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.armed = False
        self.interrupted = self.completed = 0

    def _handler(self, signum, frame):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def __enter__(self):
        # An interrupt that lands in a finalizer or a gc callback is "ignored" and goes to
        # sys.unraisablehook; pytest's hook keeps it, and its traceback's frames (a
        # callback's frame links to the frame the collection ran in) would keep a view
        # alive past the test's seal(). Count them instead.
        self.unraisable = 0
        self.old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self.old = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)
        return self

    def _unraisable(self, info):
        self.unraisable += 1

    def __exit__(self, *exc):
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self.old)
        sys.unraisablehook = self.old_hook

    def run(self, op, *args):
        try:
            self.armed = True
            op(*args)
            self.armed = False
            self.completed += 1
        except KeyboardInterrupt:
            self.interrupted += 1


@pytest.mark.usefixtures("packing")
def test_a_signal_handler_raising_every_half_millisecond_orphans_nothing(root):
    """Interrupts from a real signal handler, repeated every 0.5 ms for seconds, across all
    the write paths: the live pages, the folder and the fd count end where they started."""
    with PageCache(root, max_delay=3600, max_bytes=64 << 20) as cache:
        for op in OPERATIONS.values():
            op(cache)  # warm up
        gc.collect()
        cache.remove_released()
        start_fds = fds()
        assert cache.stats().live_pages == 0
        with Interrupter(0.0005) as interrupter:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for op in OPERATIONS.values():
                    interrupter.run(op, cache)
        # (on a loaded machine few calls, or none, may finish within 0.5 ms)
        assert interrupter.interrupted > 100, vars(interrupter)
        gc.collect()
        cache.remove_released()
        s = cache.stats()
        assert s.live_pages == 0 and s.charged_bytes == 0, s
        assert page_count_on_disk(cache) == 0, os.listdir(cache.path)
        assert fds() == start_fds


@pytest.mark.usefixtures("packing")
def test_interrupts_never_fill_the_budget_for_good(root):
    """Repeated interrupts used to leak records until max_bytes was full for good."""
    with PageCache(root, max_delay=3600, max_bytes=1 << 20) as cache:
        with Interrupter(0.0003) as interrupter:
            # until 50 calls were interrupted: a write_many is one C call, which a signal's
            # exception can only follow or precede, so few land inside one
            for _ in range(20000):
                interrupter.run(cache.write_many, [b"z" * 4096] * 20)
                if interrupter.interrupted > 50:
                    break
        assert interrupter.interrupted > 50, vars(interrupter)
        gc.collect()
        # the whole budget is there again
        page = cache.write(b"y" * ((1 << 20) - 1))
        assert page.read()[:1] == b"y"


def test_interrupted_allocate_leaves_no_fd_after_close(root):
    start = fds()
    cache = PageCache(root, max_delay=3600)
    for k in range(1, 200):
        builder, interrupted = run_interrupted_at(lambda c: c.allocate(4096), cache, k)
        if not interrupted:
            break
    assert builder is not None and k > 5
    del builder  # the one that was not interrupted
    gc.collect()
    cache.close()
    assert fds() == start


@pytest.mark.usefixtures("packing")
def test_interrupt_in_one_thread_while_another_writes(root):
    """The main thread gets the interrupts; another thread keeps writing. Nothing leaks."""
    with PageCache(root, max_delay=3600) as cache:
        stop = threading.Event()

        def writer():
            while not stop.is_set():
                cache.write(b"t" * 1000)

        t = threading.Thread(target=writer)
        t.start()
        try:
            with Interrupter(0.0005) as interrupter:
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    interrupter.run(cache.write_many, [b"m" * 500] * 5)
        finally:
            stop.set()
            t.join()
        assert interrupter.interrupted > 10, vars(interrupter)
        gc.collect()
        cache.remove_released()
        assert cache.stats().live_pages == 0
        assert page_count_on_disk(cache) == 0
