"""diskpages.zict.File against zict's own mapping checks (shipped in zict's wheel), and
what it adds: lists written as one page, zero-copy memmap, off-thread removal, nothing
left after close."""

import gc
import os
import threading

import pytest

pytest.importorskip("zict")
from zict.common import ZictBase  # noqa: E402
from zict.tests import utils_test  # noqa: E402

from diskpages import PageCache  # noqa: E402
from diskpages.zict import File  # noqa: E402


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def tasks() -> int:
    """Threads of this process, C ones included (the reaper is a pthread), less the
    kernel's io_uring workers (iou-wrk-*): the kernel starts them for an io_uring's
    blocking work and they exit on their own, a little after the ring is closed."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += not f.read().startswith("iou-")
        except FileNotFoundError:  # it exited meanwhile
            pass
    return count


@pytest.fixture
def clean_process():
    """Asserts that the test leaves no fd and no thread behind."""
    gc.collect()
    before_fds, before_tasks = fds(), tasks()
    yield
    gc.collect()
    assert fds() - before_fds == set()
    assert tasks() == before_tasks


@pytest.fixture(params=[False, True], ids=["bytearray", "memmap"])
def z(request, tmp_path, clean_process):
    f = File(tmp_path / "spill", memmap=request.param)
    yield f
    f.close()
    assert list((tmp_path / "spill").iterdir()) == []


def test_zicts_mapping_checks(z):
    assert isinstance(z, ZictBase)
    utils_test.check_mapping(z)


def test_zicts_closing_check(z):
    z["x"] = b"123"
    path = z.cache.path
    utils_test.check_closing(z)
    assert not path.exists() and len(z) == 0


def test_zicts_bad_value_checks(z):
    utils_test.check_bad_value_types(z)
    assert "x" not in z


def test_zicts_bad_key_checks(z):
    utils_test.check_bad_key_types(z)


def test_zicts_different_keys_threadsafe_check(z):
    utils_test.check_different_keys_threadsafe(z)


def test_zicts_same_key_threadsafe_check(z):
    utils_test.check_same_key_threadsafe(z)
    assert z.cache.stats().live_pages == len(z)


def test_a_list_is_one_page_written_from_its_parts(z):
    frames = [b"header", memoryview(b"x" * 70_000), bytearray(b"tail")]
    z["k"] = frames
    assert bytes(z["k"]) == b"".join(frames)
    z["t"] = tuple(frames)
    assert z.cache.stats().live_pages == 2 and z.cache.stats().written == 2


def test_getting_gives_what_zict_file_gives(tmp_path, clean_process):
    with File(tmp_path, memmap=False) as plain, File(tmp_path, memmap=True) as mapped:
        for f in (plain, mapped):
            f["a"] = b"abc" * 100_000  # a file of its own
            f["b"] = b"xyz"  # a slot
        got = plain["a"]
        assert type(got) is bytearray and got == b"abc" * 100_000
        got[0] = 0  # a copy of the caller's own
        assert plain["a"][:3] == b"abc"
        view = mapped["a"]
        assert type(view) is memoryview and view.readonly and view == b"abc" * 100_000
        del mapped["a"]  # the view stays valid: its bytes stay until it dies
        assert view[:3] == b"abc" and bytes(mapped["b"]) == b"xyz"
        del view


def test_a_failed_setting_keeps_the_old_value(z):
    z["x"] = b"old"
    with pytest.raises(TypeError):
        z["x"] = 123
    with pytest.raises(TypeError):
        z["x"] = [b"ok", 5]
    assert bytes(z["x"]) == b"old" and z.cache.stats().live_pages == 1


def test_delete_and_replace_remove_nothing_in_the_callers_thread(tmp_path, clean_process):
    """The removal is the reaper's: the deleting thread only releases (stats say the pages
    are pending until it runs, with a long max_delay)."""
    with File(tmp_path, pack_max=0, max_delay=30.0, batch=10_000) as f:
        for i in range(20):
            f[f"k{i}"] = os.urandom(1000)
        names = set(os.listdir(f.cache.path))
        for i in range(10):
            del f[f"k{i}"]
        f["k10"] = b"new"  # replacing releases the old page too
        assert set(os.listdir(f.cache.path)) >= names  # nothing removed here yet
        s = f.cache.stats()
        assert s.pending == 11 and s.live_pages == 10
        f.cache.remove_released()
        assert len(os.listdir(f.cache.path)) == 10


def test_cache_options_reach_the_cache(tmp_path, clean_process):
    with File(tmp_path, max_bytes=10_000, pack_max=0, collect_when_full=False) as f:
        assert isinstance(f.cache, PageCache) and f.cache.max_bytes == 10_000
        f["a"] = b"a" * 8000
        with pytest.raises(OSError):  # CacheFullError is an OSError (ENOSPC)
            f["b"] = b"b" * 8000
        assert list(f) == ["a"]


def test_a_dropped_file_leaves_nothing(tmp_path, clean_process):
    f = File(tmp_path)
    f["a"] = b"1" * 1000
    path = f.cache.path
    del f
    gc.collect()
    assert not path.exists()


def test_readers_racing_replacements_never_see_a_released_page(tmp_path, clean_process):
    with File(tmp_path) as f:
        f["k"] = b"0" * 5000
        stop = threading.Event()
        errors = []

        def writer():
            i = 0
            while not stop.is_set():
                i = (i + 1) % 10
                f["k"] = bytes([48 + i]) * 5000

        def reader():
            try:
                for _ in range(3000):
                    v = f["k"]
                    assert len(v) == 5000 and len(set(bytes(v))) == 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        threads[1].join()
        stop.set()
        threads[0].join()
        assert errors == []


def test_a_setting_racing_close_is_refused_and_leaves_nothing(tmp_path, clean_process):
    from diskpages import CacheClosedError

    f = File(tmp_path)
    write = f.cache.write

    def write_then_close(value):  # another thread's close() lands after the write
        page = write(value)
        f.close()
        return page

    f.cache.write = write_then_close
    with pytest.raises(CacheClosedError):
        f["k"] = b"v"
    assert len(f) == 0 and "k" not in f
    with pytest.raises(KeyError):
        f["k"]


def test_pickling_says_why_not(z):
    import pickle

    with pytest.raises(TypeError, match="belong to this process"):
        pickle.dumps(z)
