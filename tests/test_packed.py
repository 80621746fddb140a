"""Packed pages: small pages are slots in segment files, reused in place. What must hold:
a freed slot is reused; a reused slot never shows another page's bytes to a view, a read
or a borrower; the bytes on disk follow the live bytes; views count against the budget;
a forked child never reuses a parent's slot; ``diskpages ls`` counts packed pages."""

import gc
import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from diskpages import CacheFullError, PageCache, PageLostError, PageReleasedError, _folders
from diskpages import _bindings as native

from conftest import wait_until

pytestmark = pytest.mark.lifetime

KIB = 1024


def disk_bytes(folder) -> int:
    """What the folder's files hold on disk (st_blocks)."""
    total = 0
    for entry in os.scandir(folder):
        total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def pages_on_disk(cache) -> tuple[int, int]:
    """(pages, bytes) as ``diskpages ls`` counts them: page files and tagged slots."""
    fd = os.open(cache.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _folders._contents(fd)
    finally:
        os.close(fd)


def segment_slots(cache, slot_size: int) -> int:
    """How many slots the segment of that size class has room for."""
    st = os.stat(cache.path / native.segment_name(slot_size))
    return (st.st_size - native.TAGS_BYTES) // slot_size


def page_of(i: int, size: int = 4 * KIB) -> bytes:
    return (b"%08d" % i) * (size // 8)


def test_small_pages_are_slots_and_the_rest_files(tmp_path):
    with PageCache(tmp_path) as c:
        small, big = c.write(b"s" * 100), c.write(b"b" * (c.pack_max + 1))
        built = c.allocate(10).seal()
        assert small.packed and not big.packed and not built.packed
        assert sorted(os.listdir(c.path)) == sorted(["4096.slots", big.path.name, built.path.name])
        with pytest.raises(ValueError, match="packed"):
            _ = small.path  # a segment is not the page's file
        assert "slot 0 of" in repr(pickle.loads(pickle.dumps(small)))
    with PageCache(tmp_path, pack_max=0) as c:
        assert not c.write(b"s").packed
        assert c.pack_max == 0


@pytest.mark.parametrize(
    "value, error", [(-1, ValueError), (2 << 20, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_pack_max_is_checked(tmp_path, value, error):
    with pytest.raises(error, match="pack_max"):
        PageCache(tmp_path, pack_max=value)


def test_freed_slots_are_reused(tmp_path):
    with PageCache(tmp_path, max_delay=30.0) as c:
        window = [c.write(page_of(i)) for i in range(10)]
        for i in range(10, 3000):
            window.append(c.write(page_of(i)))
            window.pop(0)
        # the writer takes freed slots back before it grows the segment: room for the
        # window of 11 pages, in one growth step (a small segment grows by 256 KiB)
        assert segment_slots(c, 4 * KIB) == 64
        assert all(p.read() == page_of(i) for i, p in zip(range(2990, 3000), window, strict=False))
        c.remove_released()  # released slots keep their tag until they are freed
        assert pages_on_disk(c) == (10, 10 * 4 * KIB)
        s = c.stats()
        assert s.written == 3000 and s.live_pages == 10 and s.removed + s.pending == 2990


def test_a_view_pins_its_slot_until_it_dies(tmp_path):
    with PageCache(tmp_path, max_delay=30.0) as c:
        page = c.write(page_of(1))
        view = page.view()
        del page
        c.remove_released()
        s = c.stats()
        assert (s.live_pages, s.pinned, s.pinned_bytes, s.charged_bytes) == (0, 1, 4 * KIB, 4 * KIB)
        others = [c.write(page_of(i)) for i in range(2, 600)]  # every free slot, and more
        c.remove_released()
        assert bytes(view) == page_of(1)  # not reused under the view
        assert len({native.page_slot(p._hold) for p in others}) == len(others)
        del view
        s = c.stats()
        assert (s.pinned, s.pinned_bytes, s.charged_bytes) == (0, 0, 598 * 4 * KIB)
        again = c.write(page_of(9999))
        assert native.page_slot(again._hold) == (4 * KIB, 0)  # the lowest free slot: the one freed
        assert again.read() == page_of(9999)


def test_an_array_of_a_packed_page_pins_it_too(tmp_path):
    np = pytest.importorskip("numpy")
    with PageCache(tmp_path, max_delay=30.0) as c:
        import io

        buf = io.BytesIO()
        np.save(buf, np.arange(100, dtype=np.int64))
        page = c.write(buf.getvalue())  # a .npy page written with write(): packed
        assert page.packed
        array = page.array()
        page.release()
        c.remove_released()
        [c.write(page_of(i, 4 * KIB)) for i in range(300)]
        assert array.tolist() == list(range(100))
        assert c.stats().pinned == 1


def test_views_of_dropped_file_pages_count_against_max_bytes(tmp_path):
    mib = 1 << 20
    with PageCache(tmp_path, max_bytes=10 * mib, pack_max=0) as c:
        views = []
        for _ in range(10):
            page = c.write(b"v" * mib)
            views.append(page.view())
            del page
        c.remove_released()
        s = c.stats()
        assert (s.live_pages, s.pinned, s.pinned_bytes, s.charged_bytes) == (0, 10, 10 * mib, 10 * mib)
        with pytest.raises(CacheFullError, match="held by views"):
            c.write(b"w" * mib)
        views.pop()
        assert c.write(b"w" * mib).nbytes == mib  # one view gone: room for one page


def test_a_read_in_progress_pins_the_slot(tmp_path):
    """release() and a reuse racing a read: the read gets its page's bytes or raises."""
    import threading

    with PageCache(tmp_path, max_delay=0.001) as c:
        stop = threading.Event()
        bad = []

        def churn():
            while not stop.is_set():
                c.write(b"\xff" * 4096)

        t = threading.Thread(target=churn)
        t.start()
        try:
            for i in range(2000):
                page = c.write(page_of(i))
                threading.Thread(target=page.release).start()
                try:
                    got = page.read()
                except PageReleasedError:
                    continue
                if got != page_of(i):
                    bad.append(i)
        finally:
            stop.set()
            t.join()
        assert bad == []


def test_a_borrower_gets_the_page_or_page_lost(tmp_path):
    with PageCache(tmp_path, max_delay=30.0) as c:
        page = c.write(page_of(1))
        borrowed = pickle.loads(pickle.dumps(page))
        assert borrowed.packed and borrowed.read() == page_of(1) and bytes(borrowed.view()) == page_of(1)
        with pytest.raises(ValueError):
            _ = borrowed.path
        del page
        c.remove_released()
        with pytest.raises(PageLostError):
            borrowed.read()  # the slot is free (its tag says so)
        reuse = c.write(page_of(2))
        assert native.page_slot(reuse._hold) == (4 * KIB, 0)
        with pytest.raises(PageLostError):
            borrowed.read()  # the slot holds another page now
        with pytest.raises(PageLostError):
            borrowed.view()


BORROWER = """
import pickle, sys
from diskpages import PageLostError
handles = pickle.loads(sys.stdin.buffer.read())
print("ready", flush=True)
good = lost = 0
for round in range(40):
    for want, page in handles:
        try:
            got = page.read()
        except PageLostError:
            lost += 1
            continue
        if got != want:
            print("WRONG BYTES", flush=True)
            sys.exit(1)
        good += 1
print(good, lost)
"""


def test_a_borrower_in_another_process_never_reads_another_pages_bytes(tmp_path):
    with PageCache(tmp_path, max_delay=0.001) as c:
        pages = [c.write(page_of(i)) for i in range(200)]
        handles = pickle.dumps([(page_of(i), p) for i, p in enumerate(pages)])
        child = subprocess.Popen(
            [sys.executable, "-c", BORROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False
        )
        child.stdin.write(handles)
        child.stdin.close()
        assert child.stdout.readline() == b"ready\n"
        i = 200
        while child.poll() is None:  # the owner drops pages and reuses their slots meanwhile
            pages.pop(0)
            pages.append(c.write(page_of(i)))
            i += 1
            time.sleep(0.0005)
        out = child.stdout.read().decode()
        assert child.returncode == 0, out
        good, lost = map(int, out.split())
        assert good > 0 and lost > 0  # both seen: the reuse really raced the reads


def test_disk_bytes_follow_the_live_bytes(tmp_path):
    """During churn the segment holds the live bytes plus a growth chunk; after the live
    set falls by 90 % the reaper gives the freed slots' blocks back within a second."""
    size, live = 4 * KIB, 2000
    chunk = 1 << 20
    with PageCache(tmp_path) as c:
        window = [c.write(page_of(i, size)) for i in range(live)]
        worst = 0.0
        for i in range(live, 6 * live):
            window.append(c.write(page_of(i, size)))
            window.pop(0)
            if i % 500 == 0:
                tags = native.TAG_BYTES * segment_slots(c, size)
                worst = max(worst, (disk_bytes(c.path) - tags) / (1.25 * live * size + chunk))
        assert worst <= 1.0, worst
        del window[: live * 9 // 10]
        bound = 1.25 * len(window) * size + chunk + native.TAG_BYTES * segment_slots(c, size)
        assert wait_until(lambda: disk_bytes(c.path) <= bound, timeout=1.0), (disk_bytes(c.path), bound)
        first = 6 * live - len(window)
        assert [p.read() for p in window] == [page_of(i, size) for i in range(first, 6 * live)]


def blocks(n: int) -> int:
    """What a file of n bytes takes: its whole 4 KiB blocks, one at least."""
    return max(4 * KIB, -(-n // (4 * KIB)) * 4 * KIB)


@pytest.mark.parametrize(
    "nbytes", [1, 4 * KIB, 4 * KIB + 1, 100_000, 204_800 + 120, 255 * KIB + 1, 256 * KIB]
)
def test_up_to_256_kib_a_slot_takes_what_the_pages_file_would(tmp_path, nbytes):
    """A dask worker's 205 KB chunk (200 KiB of array and a header) takes a 204 KiB slot,
    as its file would, not the next class up; the charge, the segment and du agree."""
    with PageCache(tmp_path) as c:
        pages = [c.write(b"d" * nbytes) for _ in range(64)]
        assert all(p.packed for p in pages)
        assert os.listdir(c.path) == [f"{blocks(nbytes)}.slots"]
        assert c.stats().charged_bytes == 64 * blocks(nbytes)
        slots = segment_slots(c, blocks(nbytes))
        # the slots in use, and what the segment grew by ahead of them: at most an eighth,
        # or 256 KiB if more
        grow = max(1, 64 // 8 + 1, 256 * KIB // blocks(nbytes))
        assert 64 <= slots <= 64 + min(grow, max(1, (1 << 20) // blocks(nbytes)))
        tags = -(-native.TAG_BYTES * slots // (4 * KIB)) * 4 * KIB
        assert disk_bytes(c.path) <= slots * blocks(nbytes) + tags + 4 * KIB


@pytest.mark.parametrize(
    "nbytes, slot", [(256 * KIB + 1, 288 * KIB), (600_000, 640 * KIB), (1 << 20, 1 << 20)]
)
def test_above_256_kib_a_slot_wastes_under_an_eighth(tmp_path, nbytes, slot):
    with PageCache(tmp_path, pack_max=1 << 20) as c:
        page = c.write(b"b" * nbytes)
        assert page.packed and os.listdir(c.path) == [f"{slot}.slots"]
        assert c.stats().charged_bytes == slot < nbytes * 9 / 8


@pytest.mark.lifetime
def test_the_trim_never_cuts_a_segment_past_its_end(tmp_path):
    """A segment grows by an eighth of itself, so it is rarely a whole number of its
    current growth chunks. The trim cuts a free tail back to the chunk boundary after the
    last taken slot, which may lie past the segment's end: that cut once grew the file and
    the slot count past the bitmaps (63 pages of 204 KiB: 63 slots, a boundary at 65), and
    the next scan of them wrote outside the heap block. Each class here ends in a partial
    chunk with its last slot taken; a dropped page wakes the reaper."""
    counts = {4 * KIB: 456, 64 * KIB: 32, 100 * KIB: 64, 128 * KIB: 25, 204 * KIB: 63}
    with PageCache(tmp_path) as c:
        pages = {size: [c.write(page_of(i, size)) for i in range(n)] for size, n in counts.items()}
        slots = {size: segment_slots(c, size) for size in counts}
        for kept in pages.values():
            kept[0] = None  # the lowest slot: the last stays taken
        for _ in range(5):  # the trim waits 0.1 s before it cuts; a tick or two more
            time.sleep(0.1)
            c.remove_released()
        assert {size: segment_slots(c, size) for size in counts} == slots
        more = {size: [c.write(page_of(i, size)) for i in range(n, n + 80)] for size, n in counts.items()}
        for size, n in counts.items():
            assert [p.read() for p in pages[size][1:]] == [page_of(i, size) for i in range(1, n)]
            assert [p.read() for p in more[size]] == [page_of(i, size) for i in range(n, n + 80)]


def test_a_forked_child_never_reuses_or_frees_a_parents_slot(tmp_path):
    with PageCache(tmp_path, max_delay=0.001) as c:
        keep = [c.write(page_of(i)) for i in range(50)]
        doomed = [c.write(page_of(i)) for i in range(50, 100)]
        view = doomed[0].view()
        pid = os.fork()
        if pid == 0:  # the child: drops everything it inherited, then tries to write
            code = 0
            try:
                del keep[:], doomed[:], view
                gc.collect()
                c.remove_released()
                try:
                    c.write(b"child")
                    code = 3
                except Exception:
                    pass
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [p.read() for p in keep + doomed] == [page_of(i) for i in range(100)]
        del doomed[1:]
        c.remove_released()
        fresh = [c.write(b"\x00" * 4096) for _ in range(100)]  # reuses what the parent freed
        assert bytes(view) == page_of(50) and [p.read() for p in keep] == [page_of(i) for i in range(50)]
        assert len(fresh) == 100


def test_ls_counts_packed_pages(tmp_path):
    from diskpages.__main__ import main

    with PageCache(tmp_path, max_delay=30.0) as c:
        pages = [c.write(b"x" * n) for n in (10, 5000, 70000, 300000)]
        assert pages_on_disk(c) == (4, 10 + 5000 + 70000 + 300000)
        del pages[0]
        c.remove_released()
        assert pages_on_disk(c) == (3, 5000 + 70000 + 300000)
        infos = {i.path: i for i in _folders.list_folders(tmp_path)}
        assert (infos[c.path].pages, infos[c.path].nbytes) == (3, 375000)
        assert main(["ls", "--root", str(tmp_path)]) == 0


def test_write_many_that_fails_midway_frees_the_slots_it_took(tmp_path):
    import resource

    with PageCache(tmp_path, max_delay=30.0, pack_max=8 * KIB) as c:
        keep = c.write(page_of(0))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * KIB, hard))
        try:
            with pytest.raises(OSError):  # the third buffer is a file page past the limit
                c.write_many([page_of(1), page_of(2), b"z" * (200 * KIB)])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
        assert pages_on_disk(c) == (1, 4 * KIB)
        s = c.stats()
        assert (s.live_pages, s.charged_bytes, s.written) == (1, 4 * KIB, 1)
        assert keep.read() == page_of(0)
        more = c.write_many([page_of(3), page_of(4)])
        assert [native.page_slot(p._hold)[1] for p in more] == [1, 2]  # the slots came back


def test_sigkill_leaves_segments_for_the_sweep(tmp_path):
    code = f"""
import os, signal
from diskpages import PageCache
c = PageCache({str(tmp_path)!r})
pages = [c.write(b"k" * 4096) for _ in range(100)]
print(c.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    folder = out.stdout.strip()
    assert os.path.exists(os.path.join(folder, "4096.slots"))
    with PageCache(tmp_path):
        assert not os.path.exists(folder)  # a new cache's sweep took it


def test_tags_say_which_page_a_slot_holds(tmp_path):
    with PageCache(tmp_path, max_delay=30.0) as c:
        page = c.write(b"t" * 5000)
        size, slot = native.page_slot(page._hold)
        with open(c.path / native.segment_name(size), "rb") as f:
            f.seek(slot * native.TAG_BYTES)
            page_id, nbytes, written_ns, _ = struct.unpack("<QQQQ", f.read(32))
            f.seek(native.TAGS_BYTES + slot * size)
            data = f.read(size)
        assert (page_id, nbytes) == (page.id, 5000) and abs(written_ns / 1e9 - time.time()) < 60
        assert data == b"t" * 5000 + bytes(size - 5000)  # padded with zeros, nothing older
        assert [lp.page for lp in c.live()] == [page]


def test_a_view_a_forked_child_inherits_keeps_its_bytes_and_leaves_the_parents_slot_alone(tmp_path):
    """The parent's view of a removed page is the slot's last pin. A child inherits the view;
    the parent then drops its own and reuses the slot for another page. The child's view
    must still show the old page (it was copied at the fork, and the slot was kept until
    then), and the child's view dying must not touch the new page's tag."""
    with PageCache(tmp_path, max_delay=0.01) as c:
        old = c.write(page_of(1))
        view = old.view()
        del old
        c.remove_released()  # removed; the view alone keeps the slot
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.read(go_r, 1)  # until the parent has reused the slot
                code = 0 if bytes(view) == page_of(1) else 5
                del view  # the child's last pin
                gc.collect()
            finally:
                os._exit(code)
        try:
            del view
            new = None
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the slot comes back once the child copied
                new = c.write(page_of(2))
                if native.page_slot(new._hold) == (4 * KIB, 0):
                    break
                time.sleep(0.01)
        finally:
            os.write(go_w, b"x")
            _, status = os.waitpid(pid, 0)
        assert native.page_slot(new._hold) == (4 * KIB, 0)  # the same slot, reused
        assert os.waitstatus_to_exitcode(status) == 0  # the child's view kept the old bytes
        assert pickle.loads(pickle.dumps(new)).read() == page_of(2)  # the new tag is intact


@pytest.mark.parametrize("how", ["read", "view after", "view before", "borrow"])
def test_a_forked_child_gets_its_page_or_page_lost_never_the_next_one(tmp_path, how):
    """The child's pins are out of the parent's sight: once the parent releases the page
    and reuses its slot, the child's read and its new views check the slot's tag."""
    with PageCache(tmp_path, max_delay=30.0) as c:
        page = c.write(b"A" * 4096)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = b"?"
            try:
                early = page.view() if how == "view before" else None
                os.write(w2, b"r")
                os.read(r1, 1)  # the parent has put page B in A's slot
                try:
                    if how == "read":
                        got = page.read()[:1]
                    elif how == "view after":
                        got = bytes(page.view()[:1])
                    elif how == "view before":
                        got = bytes(early[:1])
                    else:
                        got = pickle.loads(pickle.dumps(page)).read()[:1]
                except (PageLostError, PageReleasedError):
                    got = b"E"
            finally:
                os.write(w2, got)
                os._exit(0)
        try:
            assert os.read(r2, 1) == b"r"
            page.release()
            c.remove_released()
            new = c.write(b"B" * 4096)
            assert native.page_slot(new._hold) == (4 * KIB, 0)
        finally:
            os.write(w1, b"x")
            got = os.read(r2, 1)
            os.waitpid(pid, 0)
        assert got in (b"A", b"E")


STORM = """
import os, pickle, signal, sys, time
from diskpages import PageCache

class Tick(Exception):
    pass

def fds_under(folder):
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(folder)
        except OSError:
            pass
    return n

cache = PageCache(sys.argv[1], pack_max=int(sys.argv[2]))
page = cache.write(b"k" * 5000)
borrowed = pickle.loads(pickle.dumps(page))
before = fds_under(str(cache.path))
armed = False

def handler(signum, frame):
    if armed:
        raise Tick

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
deadline = time.monotonic() + 1.5
while time.monotonic() < deadline:
    try:
        armed = True
        borrowed.read()
        borrowed.view()
        armed = False
    except Tick:
        armed = False
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print(fds_under(str(cache.path)) - before)
"""


@pytest.mark.parametrize("pack_max", [0, 256 * KIB], ids=["file", "packed"])
def test_a_signal_storm_in_a_borrowers_reads_leaks_no_fd(tmp_path, pack_max):
    """Every borrower open is owned by a C finalizer from the moment it exists, so an
    exception raised by a signal handler between any two bytecodes orphans nothing."""
    out = subprocess.run(
        [sys.executable, "-c", STORM, str(tmp_path), str(pack_max)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0", out.stdout


def test_a_segment_shrinks_when_its_pages_go(tmp_path):
    """The tail past the last taken slot goes in one ftruncate, and its tags' blocks in one
    punch: after every page of 40,000 is dropped, the segment holds about a growth chunk."""
    with PageCache(tmp_path) as c:
        pages = c.write_many([b"s" * 4096] * 40_000)
        assert disk_bytes(c.path) >= 40_000 * 4096
        keep = pages[:100]  # the oldest, lowest slots: the tail above them can go
        del pages
        assert wait_until(lambda: disk_bytes(c.path) <= 2 * (1 << 20) + 8 * KIB, timeout=1.0), disk_bytes(
            c.path
        )
        assert segment_slots(c, 4 * KIB) == 256  # cut back to one chunk
        assert [p.read() for p in keep] == [b"s" * 4096] * 100
        more = c.write_many([b"m" * 4096] * 1000)  # and it grows again
        assert [p.read() for p in more[::100]] == [b"m" * 4096] * 10


def test_a_thread_with_its_own_fd_table_never_makes_the_segment(tmp_path):
    """A segment's fd is shared by every thread: one made in a thread that unshared its
    fd table would be another file (or none) everywhere else. That thread's page gets a
    file instead, and the segment is made by a thread of the process's table."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    decoy_path = tmp_path / "decoy"
    decoy_path.write_bytes(b"not a page")
    with PageCache(tmp_path / "root") as c:
        decoy = os.open(decoy_path, os.O_RDWR)  # its number is free in the thread's table
        made = []

        def own_table():
            if libc.unshare(0x400) != 0:  # CLONE_FILES
                made.append(None)
                return
            os.close(decoy)
            made.append(c.write(b"the page"))

        t = threading.Thread(target=own_table)
        t.start()
        t.join()
        if made == [None]:
            pytest.skip("unshare(CLONE_FILES) is not allowed here")
        second = c.write(b"second page")
        os.close(decoy)
        assert decoy_path.read_bytes() == b"not a page"
        assert not made[0].packed and made[0].read() == b"the page"
        assert second.packed and second.read() == b"second page"


def test_a_view_of_a_segment_cut_short_raises_page_lost(tmp_path):
    with PageCache(tmp_path) as c:
        page = c.write(b"x" * 8192)
        size, _ = native.page_slot(page._hold)
        os.truncate(c.path / native.segment_name(size), native.TAGS_BYTES + 100)
        with pytest.raises(PageLostError):
            page.view()  # a mapping past the end would fault (SIGBUS)
        with pytest.raises(PageLostError):
            page.read()


def test_writers_growing_a_segment_while_the_trim_cuts_its_tail_lose_nothing(tmp_path):
    """The trim cuts a segment's tail with its lock let go (an ftruncate can wait for the
    disk): a writer that grows the segment meanwhile must not have its slot cut away."""
    import threading

    with PageCache(tmp_path, max_delay=0.001) as c:
        stop = threading.Event()
        bad: list[int] = []

        def burst():  # grows the segment by thousands of slots, then frees them all
            while not stop.is_set():
                pages = c.write_many([b"b" * 4096] * 3000)
                del pages

        def steady():
            kept = []
            for i in range(6000):
                kept.append(c.write(page_of(i)))
                if len(kept) > 50:
                    old = kept.pop(0)
                    if old.read() != page_of(i - 50):
                        bad.append(i)
            stop.set()

        threads = [threading.Thread(target=burst), threading.Thread(target=steady)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bad == []


def test_a_view_mapping_closed_by_hand_is_forgotten_before_a_fork(tmp_path):
    """view.obj.close() unmaps the view: the fork's copy of views must not read from, or
    map over, that address (the child crashed, or lost memory placed there since)."""
    with PageCache(tmp_path) as c:
        page = c.write(b"x" * 256 * KIB)
        view = page.view()
        mapping = view.obj
        with pytest.raises(BufferError):
            mapping.close()  # still exported: it stays, and so does its protection
        view.release()
        mapping.close()
        reused = mmap.mmap(-1, 256 * KIB)  # memory that may land where the view was
        reused[:4] = b"abcd"
        pid = os.fork()
        if pid == 0:
            try:
                reused[:4] = b"wxyz"  # still ours, and writable
                os._exit(0 if reused[:4] == b"wxyz" else 5)
            finally:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with pytest.raises(ValueError):
            page.view().obj.resize(1)  # a view's mapping never moves


def test_the_last_view_of_a_removed_page_gives_its_slot_back_with_nothing_live(tmp_path):
    """No page live or pending, so nothing wakes the reaper; the views' death still frees
    their slots, and the trim gives the space back."""
    with PageCache(tmp_path) as c:
        pages = c.write_many([b"v" * 256 * KIB] * 200)  # 50 MiB
        views = [p.view() for p in pages]
        del pages
        c.remove_released()
        assert c.stats().pinned == 200
        del views
        assert wait_until(lambda: disk_bytes(c.path) < 2 * (1 << 20) + 64 * KIB, timeout=1.0), disk_bytes(
            c.path
        )
        assert c.stats().pinned == 0 and c.stats().charged_bytes == 0
