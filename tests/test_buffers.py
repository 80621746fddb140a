"""No buffer export of the caller's data outlives the call that made it: after a write path
raises, nothing its traceback reaches holds an export (a cffi buffer or a memoryview) of
the caller's buffer, so the caller can resize a bytearray it passed at once, and no
reference cycle through the traceback keeps an export for the collector to clear (which
crashed CPython 3.12 before 3.12.7: gh-77894)."""

import gc
import logging

import pytest

from diskpages import CacheClosedError, CacheFullError, PageCache

pytestmark = pytest.mark.lifetime  # also under AddressSanitizer in CI (.ci/asan)

KiB = 1024


def resizable(data: bytearray) -> bool:
    """Whether no export of ``data`` is alive: a bytearray with one refuses to resize."""
    try:
        data.append(0)
    except BufferError:
        return False
    del data[-1]
    return True


def raised(call, *args):
    """The exception ``call(*args)`` raised, kept (with its traceback and frames) while the
    caller looks at its buffers, as a log record or a test report would keep it."""
    with pytest.raises(Exception) as info:
        call(*args)
    return info.value


@pytest.fixture
def full(tmp_path):
    """A cache whose budget is all taken by one live page."""
    with PageCache(tmp_path, max_bytes=64 * KiB, collect_when_full=False, pack_max=0) as cache:
        page = cache.write(bytes(64 * KiB))
        yield cache
        del page


def test_write_paths_on_a_full_budget_keep_no_export(full):
    data = [bytearray(b"x" * 8 * KiB) for _ in range(3)]
    for call, args in [
        (full.write, (data[0],)),
        (full.write_many, (data,)),
        (full.write_parts, (data,)),
    ]:
        exc = raised(call, *args)
        assert isinstance(exc, CacheFullError) and exc.__traceback__ is not None
        assert all(map(resizable, data)), call.__name__


def test_write_paths_on_a_closed_cache_keep_no_export(tmp_path):
    cache = PageCache(tmp_path)
    cache.close()
    data = [bytearray(100), bytearray(200)]
    for call, args in [(cache.write, (data[0],)), (cache.write_many, (data,)), (cache.write_parts, (data,))]:
        exc = raised(call, *args)
        assert isinstance(exc, CacheClosedError), call.__name__
        assert all(map(resizable, data)), call.__name__


def test_a_bad_buffer_after_good_ones_keeps_no_export_of_the_good_ones(tmp_path):
    with PageCache(tmp_path) as cache:
        good = [bytearray(10), bytearray(20)]
        for call in (cache.write_many, cache.write_parts):
            exc = raised(call, [*good, "not bytes", bytearray(5)])
            assert isinstance(exc, TypeError)
            assert all(map(resizable, good)), call.__name__


def test_readinto_that_fails_keeps_no_export(tmp_path):
    import pickle

    with PageCache(tmp_path, pack_max=0) as cache:
        page = cache.write(b"abc" * 1000)
        borrowed = pickle.loads(pickle.dumps(page))
        small = bytearray(10)
        for reader in (page, borrowed):
            exc = raised(reader.readinto, small)
            assert isinstance(exc, ValueError)
            assert resizable(small)
        target = bytearray(len(page))
        page.release()
        cache.remove_released()
        for reader in (page, borrowed):
            raised(reader.readinto, target)
            assert resizable(target)


def test_a_builder_write_that_fails_keeps_no_export(tmp_path):
    from diskpages import PageReleasedError

    with PageCache(tmp_path) as cache:
        builder = cache.allocate(100)
        builder._discard()  # (what write_array() does with a builder a write failed on)
        data = bytearray(100)
        exc = raised(builder._write_at, data, 0)
        assert isinstance(exc, PageReleasedError)
        assert resizable(data)


def test_the_adapters_sets_on_a_full_budget_keep_no_export(tmp_path):
    pytest.importorskip("zict")
    from diskpages.zict import File

    with File(tmp_path / "z", max_bytes=64 * KiB, collect_when_full=False, pack_max=0) as z:
        z["held"] = bytes(64 * KiB)
        value = bytearray(8 * KiB)
        exc = raised(z.__setitem__, "k", value)
        assert isinstance(exc, CacheFullError)
        assert resizable(value)
        parts = [bytearray(KiB), bytearray(KiB)]
        raised(z.__setitem__, "k", parts)
        assert all(map(resizable, parts))


def test_a_full_spill_then_a_collection(tmp_path, caplog):
    """What crashed 3.12.1: distributed's SpillBuffer meets a full budget (it logs the
    error with its traceback and keeps the key in memory), then the collector runs."""
    pytest.importorskip("distributed")
    from diskpages.dask import SpillBuffer

    buf = SpillBuffer(str(tmp_path), target=1, max_bytes=64 * KiB, pack_max=0)
    try:
        values = [bytearray(40 * KiB) for _ in range(4)]
        # distributed logs the failure with its traceback, whose frames are distributed's
        # and hold its own memoryviews of the value; no log record is kept here, so only
        # what diskpages holds could keep an export
        with caplog.at_level(logging.CRITICAL + 1, logger="distributed.spill"):
            for i, v in enumerate(values):
                buf[f"x{i}"] = v  # the second on fails to spill, and stays in memory
        assert len(buf.fast) >= 2
        # sys.last_exc and friends, and any log record, must not matter either
        gc.collect()
        gc.collect()
        assert all(map(resizable, [v for k, v in buf.fast.items()]))
    finally:
        buf.close()


def test_an_empty_array_on_a_full_budget_is_a_full_budget(tmp_path):
    np = pytest.importorskip("numpy")
    with PageCache(tmp_path, max_bytes=4 * KiB, collect_when_full=False) as cache:
        kept = cache.write(b"x")  # one 4 KiB slot: the whole budget
        with pytest.raises(CacheFullError):
            cache.write_array(np.zeros(0, np.uint8))
        del kept


def test_a_released_memoryview_says_so(tmp_path):
    with PageCache(tmp_path) as cache:
        view = memoryview(b"abc")
        view.release()
        for call, arg in ((cache.write, view), (cache.write_many, [view]), (cache.write_parts, [view])):
            with pytest.raises(ValueError, match="released"):
                call(arg)
