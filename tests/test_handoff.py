"""What the dask and zict adapters stand on, tested on its own: one page from many buffers
(write_parts), a read into the caller's buffer (readinto), a budget that fails fast for an
event loop (collect_when_full=False, CacheFullError an OSError), and a page written in one
process made the own of another (adopt)."""

import errno
import gc
import multiprocessing
import os
import pickle
import time
import uuid
from pathlib import Path

import pytest

from diskpages import BorrowedPage, CacheFullError, PageCache, PageLostError, PageReleasedError

from conftest import files_in, page_count_on_disk

KiB, MiB = 1024, 1024 * 1024


# -- write_parts ---------------------------------------------------------------------------


@pytest.mark.parametrize("pack_max", [0, 256 * KiB])
@pytest.mark.parametrize("nparts", [0, 1, 3, 1500])  # 1500: over IOV_MAX (1024)
def test_write_parts_is_the_parts_end_to_end(root, pack_max, nparts):
    parts = [os.urandom(i % 37) for i in range(nparts)]
    parts[:1] = [bytearray(b"head")] if nparts else []
    with PageCache(root, pack_max=pack_max) as cache:
        page = cache.write_parts(iter(parts))  # any iterable
        assert page.read() == b"".join(parts) and page.nbytes == sum(map(len, parts))
        assert page.packed == (pack_max > 0)


def test_write_parts_packs_by_the_total_size(root):
    with PageCache(root, pack_max=64 * KiB) as cache:
        small = cache.write_parts([b"a" * 40 * KiB, memoryview(b"b" * 20 * KiB)])
        big = cache.write_parts([b"a" * 40 * KiB, b"b" * 40 * KiB])
        assert small.packed and not big.packed
        assert small.read() == b"a" * 40 * KiB + b"b" * 20 * KiB
        assert big.path.read_bytes() == b"a" * 40 * KiB + b"b" * 40 * KiB


def test_write_parts_is_all_or_nothing(root):
    with PageCache(root) as cache:
        for bad in ([b"ok", object()], [b"ok", memoryview(b"abcd")[::2]]):
            with pytest.raises((TypeError, BufferError)):
                cache.write_parts(bad)
        with pytest.raises(TypeError, match="write\\(\\) writes one buffer"):
            cache.write_parts(b"one buffer")  # not an iterable of ints, quietly
        s = cache.stats()
        assert s.written == 0 and s.charged_bytes == 0 and page_count_on_disk(cache) == 0


def test_write_parts_is_budget_checked(root):
    with PageCache(root, max_bytes=100 * KiB) as cache:
        keep = cache.write_parts([b"x" * 60 * KiB])
        with pytest.raises(CacheFullError):
            cache.write_parts([b"y" * 30 * KiB, b"z" * 30 * KiB])
        assert cache.stats().written == 1 and keep.read() == b"x" * 60 * KiB


# -- readinto ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 5000, 3 * MiB])  # a slot, a file
def test_readinto_fills_the_callers_buffer(cache, nbytes):
    data = os.urandom(nbytes)
    page = cache.write(data)
    buf = bytearray(nbytes + 10)
    assert page.readinto(buf) == nbytes
    assert buf[:nbytes] == data and buf[nbytes:] == bytes(10)
    with pytest.raises(TypeError, match="writable"):
        page.readinto(b"\0" * nbytes)
    if nbytes:
        with pytest.raises(ValueError, match=f"has {nbytes}"):
            page.readinto(bytearray(nbytes - 1))
    page.release()
    with pytest.raises(PageReleasedError):
        page.readinto(buf)


# -- the budget, for an event loop --------------------------------------------------------------


def test_cache_full_error_is_an_oserror_for_a_full_disk():
    e = CacheFullError("writing 5 bytes would take it past max_bytes")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e) == "writing 5 bytes would take it past max_bytes"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is CacheFullError and str(again) == str(e) and again.errno == errno.ENOSPC


class Cycle:
    def __init__(self, page):
        self.page, self.me = page, self


def test_collect_when_full_false_raises_without_collecting_or_removing(root, no_gc):
    """An event loop's write must not run gc.collect() nor remove files itself: it gets
    CacheFullError at once, and the reaper removes what was released."""
    collections = []

    def watch(phase, info):
        collections.append(phase)

    with PageCache(root, max_bytes=100 * KiB, collect_when_full=False, max_delay=30.0) as cache:
        Cycle(cache.write(b"c" * 60 * KiB))  # only a collection frees it
        gc.callbacks.append(watch)
        try:
            with pytest.raises(CacheFullError, match="collect_when_full=False"):
                cache.write(b"n" * 60 * KiB)
        finally:
            gc.callbacks.remove(watch)
        assert collections == [] and cache.stats().live_pages == 1
    with PageCache(root, max_bytes=100 * KiB, max_delay=30.0) as cache:  # the default collects
        Cycle(cache.write(b"c" * 60 * KiB))
        assert cache.write(b"n" * 60 * KiB).nbytes == 60 * KiB


def test_collect_when_full_false_removes_released_pages_off_the_writers_thread(root):
    with PageCache(root, max_bytes=100 * KiB, collect_when_full=False, max_delay=30.0) as cache:
        cache.write(b"a" * 60 * KiB).release()  # pending until the reaper runs
        try:
            cache.write(b"b" * 60 * KiB)
        except CacheFullError:
            pass  # the reaper was kicked, not waited for
        for _ in range(500):
            if cache.stats().pending == 0:
                break

            time.sleep(0.01)
        assert cache.stats().pending == 0
        assert cache.write(b"b" * 60 * KiB).nbytes == 60 * KiB


def test_collect_when_full_must_be_a_bool(root):
    with pytest.raises(TypeError, match="collect_when_full"):
        PageCache(root, collect_when_full=1)


# -- adopt: ownership across processes ----------------------------------------------------------


def _write_in_worker(root: str, nbytes: int, seed: int) -> tuple[BorrowedPage, bytes]:
    """A pool worker's page, handed over: the worker's Page goes as this returns, and its
    cache closes when the worker exits; the handed bytes stay until adopted."""
    data = (seed.to_bytes(4, "little") * (nbytes // 4 + 1))[:nbytes]
    cache = _caches[root] if root in _caches else _worker_cache(root)
    return cache.write(data).hand_over(), data


_caches: dict[str, PageCache] = {}


def _worker_cache(root: str) -> PageCache:
    _caches[root] = PageCache(root)
    return _caches[root]


@pytest.mark.parametrize("nbytes", [3 * MiB, 10 * KiB])  # a file; a slot, copied into a file
def test_adopt_outlives_the_worker_that_wrote_the_page(root, nbytes):
    ctx = multiprocessing.get_context("spawn")
    with PageCache(root) as mine:
        pool = ctx.Pool(1)
        handed, data = pool.apply(_write_in_worker, (str(root), nbytes, 7))
        assert isinstance(handed, BorrowedPage) and not handed.packed
        # the worker's Page is gone by now; only the handed name holds the bytes
        assert handed.read() == data
        inode = os.stat(handed.path).st_ino
        page = mine.adopt(handed)
        assert page.cache is mine and page.nbytes == nbytes
        assert not handed.path.exists()  # moved, not copied: the worker holds nothing more
        if not page.packed:  # zero-copy: the same inode, under our name
            assert os.stat(page.path).st_ino == inode
        pool.close()  # the worker exits, which closes its cache and removes its folder
        pool.join()
        assert sorted(p.name for p in root.iterdir()) == [mine.path.name]
        with pytest.raises(PageLostError):
            handed.read()
        assert page.read() == data and bytes(page.view()) == data
        path = None if page.packed else page.path
        del page
        mine.remove_released()
        assert page_count_on_disk(mine) == 0 and (path is None or not path.exists())


def test_handed_bytes_stay_until_adopted_or_closed(root):
    with PageCache(root) as owner:
        handed = [owner.write(os.urandom(n)).hand_over() for n in (100, 2 * MiB)]  # pages dropped
        owner.remove_released()
        assert [h.read() for h in handed] == [h.read() for h in pickle.loads(pickle.dumps(handed))]
        assert all(h.path.exists() for h in handed)
        assert owner.stats().live_pages == 0
    assert not any(h.path.exists() for h in handed)  # never adopted: close took them
    with pytest.raises(PageLostError):
        handed[0].read()


def test_a_page_handed_over_twice_is_two_handles(root):
    with PageCache(root) as owner, PageCache(root) as a, PageCache(root) as b:
        page = owner.write(b"x" * 2 * MiB)
        first, second = page.hand_over(), page.hand_over()
        assert first.path != second.path
        mine, yours = a.adopt(first), b.adopt(second)
        with pytest.raises(PageLostError):
            a.adopt(first)  # moved already
        del page
        owner.close()
        assert mine.read() == yours.read() == b"x" * 2 * MiB


@pytest.mark.parametrize("handed", [False, True])
def test_adopt_copies_across_file_systems(root, handed):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    other = shm / f"diskpages-test-{uuid.uuid4().hex}"
    try:
        with PageCache(root) as owner, PageCache(other) as mine:
            data = os.urandom(2 * MiB)
            theirs = owner.write(data)
            handle = theirs.hand_over() if handed else pickle.loads(pickle.dumps(theirs))
            page = mine.adopt(handle)
            assert os.stat(page.path).st_ino != os.stat(theirs.path).st_ino
            assert handle.path.exists() != handed  # a handed name goes once its bytes are copied
            del theirs
            owner.close()
            assert page.read() == data
    finally:
        if other.exists():
            for p in other.iterdir():
                os.rmdir(p)
            os.rmdir(other)


def test_adopt_an_owned_page_of_another_cache(root):
    with PageCache(root) as a, PageCache(root) as b:
        for nbytes in (1 * MiB + 1, 100):
            data = os.urandom(nbytes)
            theirs = a.write(data)
            mine = b.adopt(theirs)
            theirs.release()
            a.remove_released()
            assert mine.read() == data and mine.cache is b


def test_adopt_a_page_gone_already_raises_page_lost(root):
    with PageCache(root) as owner, PageCache(root) as mine:
        for nbytes in (2 * MiB, 100):
            page = owner.write(b"q" * nbytes)
            borrowed = pickle.loads(pickle.dumps(page))
            page.release()
            owner.remove_released()
            with pytest.raises(PageLostError):
                mine.adopt(borrowed)
        assert mine.stats().written == 0 and mine.stats().charged_bytes == 0
        assert files_in(mine.path) == [] or page_count_on_disk(mine) == 0


def test_adopt_counts_against_max_bytes(root):
    with PageCache(root) as owner, PageCache(root, max_bytes=3 * MiB) as mine:
        theirs = owner.write(b"z" * 2 * MiB)
        keep = mine.adopt(theirs)
        with pytest.raises(CacheFullError):
            mine.adopt(theirs)
        assert keep.nbytes == 2 * MiB and mine.stats().live_pages == 1


def test_adopt_needs_a_page(cache):
    with pytest.raises(TypeError, match="Page or a BorrowedPage"):
        cache.adopt(b"bytes")


def test_a_borrower_reads_into_a_buffer(cache):
    for nbytes in (100, 2 * MiB):
        data = os.urandom(nbytes)
        borrowed = pickle.loads(pickle.dumps(page := cache.write(data)))
        buf = bytearray(nbytes + 1)
        assert borrowed.readinto(buf) == nbytes and buf[:nbytes] == data
        with pytest.raises(ValueError):
            borrowed.readinto(bytearray(nbytes - 1))
        del page


def test_a_cache_full_error_without_a_message_says_nothing_odd():
    assert str(CacheFullError()) == "" and CacheFullError().errno is None


def test_hand_over_and_adopt_without_o_tmpfile(root, monkeypatch):
    """Where the file system has no O_TMPFILE, a packed page's handed copy is made under its
    handed name directly, and a copy adopted across file systems as a .part renamed."""
    monkeypatch.setenv("DISKPAGES_TMPFILE", "0")  # as on a file system without it
    with PageCache(root) as owner, PageCache(root) as mine:
        for nbytes in (100, 2 * MiB):  # a slot, copied; a file, linked
            data = os.urandom(nbytes)
            handed = owner.write(data).hand_over()
            owner.remove_released()
            assert handed.read() == data
            page = mine.adopt(handed)
            assert page.read() == data and not handed.path.exists()
        assert sorted(p.suffix for p in owner.path.iterdir() if p.suffix != ".slots") == []
