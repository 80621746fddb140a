"""NumPy arrays as pages: .npy files numpy opens, zero-copy read-only arrays, arrays built
in place, refusals (objects, bad arguments, pages that are not .npy), and diskpages
without NumPy."""

import io
import os
import pickle
import string
import subprocess
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskpages import PageCache, PageLostError, PageReleasedError, _bindings

from conftest import files_in, run_python

np = pytest.importorskip("numpy")
hnp = pytest.importorskip("hypothesis.extra.numpy")


def same(a, b) -> bool:
    """Same dtype, shape and bytes (so NaNs, -0.0 and padding count)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def npy_version(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        return np.lib.format.read_magic(f)


def assert_round_trip(cache, array):
    page = cache.write_array(array)
    expected = np.asarray(array)
    assert page.nbytes == len(page) == os.stat(page.path).st_size
    assert same(np.load(page.path, mmap_mode="r"), expected)
    assert same(np.load(page.path), expected)
    got = page.array()
    assert same(got, expected)
    assert not got.flags.writeable
    return page, got


STRUCTURED = np.dtype(
    [("id", "<u4"), ("pos", ">f8", (2, 3)), ("name", "U5"), ("sub", [("a", "i1"), ("b", "c8")])]
)
PADDED = np.dtype({"names": ["a", "b"], "formats": ["u1", "<f8"], "offsets": [0, 8], "itemsize": 24})

CASES = {
    "float64 2-d": np.arange(12.0).reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4)),
    "strided": np.arange(40, dtype=np.int16)[::3],
    "transposed 3-d slice": np.arange(120.0).reshape(4, 5, 6).transpose(2, 0, 1)[:, 1:, ::2],
    "0-d": np.array(3.5),
    "empty": np.zeros((0,)),
    "empty 2-d": np.zeros((3, 0), dtype=np.uint8),
    "big-endian": np.arange(10, dtype=">i8"),
    "complex": np.array([1 + 2j, -3.5j, np.nan], dtype=np.complex128),
    "float16 with nan and -0": np.array([np.nan, -0.0, np.inf], dtype=np.float16),
    "unicode": np.array(["", "ab", "ünïcödé"]),
    "bytes": np.array([b"x", b"yz\x00"]),
    "bool": np.array([[True, False], [False, True]]),
    "datetime64": np.array(["2026-11-22", "NaT"], dtype="datetime64[ns]"),
    "timedelta64": np.array([1, -2], dtype="timedelta64[s]"),
    "structured": np.zeros(4, dtype=STRUCTURED),
    "padded structured": np.ones(3, dtype=PADDED),
    "aligned structured": np.zeros(2, dtype=np.dtype([("x", "u1"), ("y", "<f4")], align=True)),
    "items of 0 bytes": np.zeros((2, 3), dtype=np.dtype([])),
    "void of 0 bytes": np.zeros(3, dtype="V0"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_write_array_round_trip(cache, name):
    page, got = assert_round_trip(cache, CASES[name])
    assert npy_version(page.path) == (1, 0)


def test_list_and_scalar_input(cache):
    assert_round_trip(cache, [[1, 2], [3, 4]])
    assert_round_trip(cache, 7)


def test_fortran_input_is_written_in_fortran_order(cache):
    array = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    page = cache.write_array(array)
    with open(page.path, "rb") as f:
        np.lib.format.read_magic(f)
        _, fortran_order, _ = np.lib.format.read_array_header_1_0(f)
        assert fortran_order
        assert f.read() == array.T.tobytes()  # its own memory, as it lies
    got = page.array()
    assert got.flags.f_contiguous and not got.flags.c_contiguous
    assert same(got, array)


def test_non_contiguous_input_is_written_in_c_order(cache):
    array = np.arange(20.0).reshape(4, 5)[:, ::2]
    got = cache.write_array(array).array()
    assert got.flags.c_contiguous
    assert same(got, array)


def test_header_too_long_for_format_1_uses_2(cache):
    dtype = np.dtype([(f"field_with_a_long_name_{i:05d}", "u1") for i in range(3000)])
    array = np.zeros(2, dtype=dtype)
    array[f"field_with_a_long_name_{2999:05d}"] = 7
    page = cache.write_array(array)
    assert npy_version(page.path) == (2, 0)
    # numpy.load caps headers at 10,000 characters unless told; page.array() reads its own
    assert same(np.load(page.path, mmap_mode="r", max_header_size=10**6), array)
    assert same(page.array(), array)


def test_field_names_beyond_latin1_are_refused(cache):
    array = np.zeros(2, dtype=[("名前", "u1")])
    with pytest.raises(ValueError, match="latin-1"):
        cache.write_array(array)
    assert os.listdir(cache.path) == []


OBJECT_ARRAYS = {
    "object": np.array([1, "a", None], dtype=object),
    "field of objects": np.zeros(2, dtype=[("a", "f8"), ("b", "O")]),
    "list of mixed": [1, "mixed", None],  # numpy.asarray makes an object array of it
}
if hasattr(np, "dtypes") and hasattr(np.dtypes, "StringDType"):  # numpy 2
    OBJECT_ARRAYS["StringDType"] = np.array(["variable", "width"], dtype=np.dtypes.StringDType())


@pytest.mark.parametrize("array", list(OBJECT_ARRAYS.values()), ids=list(OBJECT_ARRAYS))
def test_object_arrays_are_refused(cache, array):
    with pytest.raises(TypeError, match="pickle"):
        cache.write_array(array)
    assert os.listdir(cache.path) == []
    assert cache.stats().written == 0


@pytest.mark.parametrize("sync", ["none", "data", "full"])
@pytest.mark.parametrize("strided", [False, True])
def test_write_array_in_every_sync_mode(root, sync, strided):
    array = np.arange(2000, dtype=np.float32)
    with PageCache(root, sync=sync) as cache:
        assert_round_trip(cache, array[::2] if strided else array[:1000])


def test_strided_input_is_never_copied_whole_in_memory(cache, monkeypatch):
    # written in pieces of at most CHUNK bytes; a contiguous copy first would double the
    # memory (or not fit, for a slice of a memmap larger than memory)
    import tracemalloc

    from diskpages import _arrays

    monkeypatch.setattr(_arrays, "CHUNK", 1 << 20)
    array = np.ones((1024, 4096))[:, ::2]  # 16 MiB of data, strided
    tracemalloc.start()
    try:
        page = cache.write_array(array)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, peak  # numpy's data allocations are traced: one piece, not 16 MiB
    assert same(page.array(), array)


@pytest.mark.parametrize(
    "name, array",
    [
        ("1-d", np.arange(1000, dtype=np.int32)[::3]),
        ("rows bigger than a piece", np.arange(6000.0).reshape(6, 1000)[:, ::2]),
        ("3-d transposed slice", np.arange(4800.0).reshape(8, 20, 30).transpose(2, 0, 1)[:, 1:, ::2]),
        ("structured", np.zeros(200, dtype=STRUCTURED)[::3]),
        ("big-endian, reversed", np.arange(500, dtype=">i8")[::-1]),
    ],
)
def test_strided_input_is_written_in_pieces_in_c_order(cache, monkeypatch, name, array):
    from diskpages import _arrays

    monkeypatch.setattr(_arrays, "CHUNK", 64)  # many pieces, split below the first axis too
    assert not (array.flags.c_contiguous or array.flags.f_contiguous)
    assert_round_trip(cache, array)


def test_strided_write_interrupted_leaves_nothing_even_while_its_traceback_lives(root, monkeypatch):
    from diskpages import PageBuilder, _arrays

    calls = []

    def interrupted(self, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return len(memoryview(data).cast("B"))

    monkeypatch.setattr(PageBuilder, "_write_at", interrupted)
    monkeypatch.setattr(_arrays, "CHUNK", 64 * 1024)
    with PageCache(root, max_bytes=1 << 20) as cache:
        fds = len(os.listdir("/proc/self/fd"))
        try:
            cache.write_array(np.zeros((200, 600))[:, ::2])  # 480 KB in 64 KB pieces
        except KeyboardInterrupt as e:
            kept = e  # as an interactive session keeps the last traceback
        assert len(calls) == 3
        assert cache.stats().live_pages == 0  # released, not waiting for the traceback
        cache.remove_released()
        assert files_in(cache.path) == [] and cache.stats().charged_bytes == 0
        assert len(os.listdir("/proc/self/fd")) == fds  # the page's fd is closed too
        del kept


def test_empty_array_page_is_never_empty(cache):
    page, got = assert_round_trip(cache, np.zeros((0, 4), dtype=np.float32))
    assert got.shape == (0, 4)
    assert page.nbytes > 0 and len(page.view()) == page.nbytes  # the header
    assert page.nbytes % 64 == 0  # numpy pads the header so the data is aligned


# -- page.array() -----------------------------------------------------------------------


def test_array_is_read_only(cache):
    got = cache.write_array(np.arange(5)).array()
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0] = 1
    with pytest.raises(ValueError):
        got.flags.writeable = True


def test_array_is_zero_copy_over_the_file(cache):
    page = cache.write_array(np.zeros(8, dtype=np.int64))
    got = page.array()
    header = page.nbytes - got.nbytes
    fd = os.open(page.path, os.O_WRONLY)
    try:  # a change to the file shows through the shared mapping: no copy was made
        os.pwrite(fd, np.int64(42).tobytes(), header + 3 * 8)
    finally:
        os.close(fd)
    assert got[3] == 42


def test_array_data_is_aligned(cache):
    got = cache.write_array(np.arange(10, dtype=np.complex128)).array()
    assert got.flags.aligned
    assert got.ctypes.data % 64 == 0


def test_array_outlives_release_and_close(root):
    cache = PageCache(root)
    array = np.arange(1000.0)
    page = cache.write_array(array)
    got = page.array()
    page.release()
    cache.remove_released()
    assert not page.path.exists()
    assert same(got, array)
    cache.close()
    assert same(got, array)


def test_array_of_released_page(cache):
    page = cache.write_array(np.arange(3))
    page.release()
    with pytest.raises(PageReleasedError):
        page.array()


def test_array_of_page_of_closed_cache(root):
    cache = PageCache(root)
    page = cache.write_array(np.arange(3))
    cache.close()
    with pytest.raises(PageReleasedError):
        page.array()


def test_array_of_vanished_or_truncated_file(cache):
    gone = cache.write_array(np.arange(3))
    os.unlink(gone.path)
    with pytest.raises(PageLostError):
        gone.array()
    cut = cache.write_array(np.arange(1000))
    os.truncate(cut.path, 200)
    with pytest.raises(PageLostError):
        cut.array()


def npy_bytes(array) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Stored array in format 3.0"
        np.save(out, array)
    return out.getvalue()


def test_array_of_npy_written_by_numpy(cache):
    array = np.arange(12, dtype=">u2").reshape(3, 4)
    assert same(cache.write(npy_bytes(array)).array(), array)


NOT_NPY = {
    "empty page": b"",
    "junk": b"not an array at all" * 10,
    "magic only": b"\x93NUMPY\x01\x00",
    "data cut short": npy_bytes(np.arange(10))[:-8],
    "data too long": npy_bytes(np.arange(10)) + b"\x00" * 8,
    "header not a dict": b"\x93NUMPY\x01\x00\x0c\x00[1, 2, 3]  \n",
    "pickled objects": npy_bytes(np.array([1, None], dtype=object)),
    "format 3.0": npy_bytes(np.zeros(1, dtype=[("名前", "u1")])),
}


@pytest.mark.parametrize("name", list(NOT_NPY))
def test_array_of_page_that_is_not_npy(cache, name):
    page = cache.write(NOT_NPY[name])
    with pytest.raises(ValueError, match=f"page {page.id}"):
        page.array()
    assert page.read() == NOT_NPY[name]  # the page itself is fine


def test_array_of_page_written_as_raw_bytes_says_which_call_makes_array_pages(cache):
    raw = cache.write(np.arange(10.0))  # write() keeps the bytes only: no .npy header
    builder = cache.allocate(80)
    for owner in (raw, builder, pickle.loads(pickle.dumps(raw))):
        with pytest.raises(ValueError, match=f"^page {owner.id} is not a .npy array: ") as info:
            owner.array()
        assert "write_array()" in str(info.value) and "allocate_array()" in str(info.value)
        assert "numpy.frombuffer" in str(info.value)
    assert np.array_equal(np.frombuffer(raw.view(), np.float64), np.arange(10.0))


def mapping_under(array):
    """What an array's memory finally belongs to, down its chain of bases."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_numpy_array_protocol_is_array_zero_copy_and_read_only(cache):
    import mmap

    data = np.arange(12, dtype=np.int32).reshape(3, 4)
    page = cache.write_array(data)
    for owner in (page, pickle.loads(pickle.dumps(page))):
        for out in (np.asarray(owner), np.asarray(owner, dtype=np.int32), np.array(owner, copy=False)):
            assert same(out, data) and same(out, owner.array())
            assert out.flags.writeable is False  # over the page's read-only mapping
            assert isinstance(mapping_under(out), mmap.mmap)  # zero-copy
            with pytest.raises(ValueError, match="read-only"):
                out[0, 0] = 1
        for copied in (np.array(owner), np.asarray(owner, copy=True)):
            assert same(copied, data) and copied.flags.writeable is True
            assert not isinstance(mapping_under(copied), mmap.mmap)
            copied[0, 0] = 7  # a copy of its own: the page is unchanged
        converted = np.asarray(owner, dtype=np.float64)
        assert converted.dtype == np.float64 and np.array_equal(converted, data)
        with pytest.raises(ValueError, match="copy"):
            np.array(owner, dtype=np.float64, copy=False)
        assert int(np.sum(owner)) == int(data.sum())
    assert same(page.array(), data)


def test_numpy_array_protocol_refuses_a_page_that_is_not_an_array(cache):
    raw = cache.write(np.arange(4.0))
    for owner in (raw, pickle.loads(pickle.dumps(raw))):
        with pytest.raises(ValueError, match=f"^page {owner.id} is not a .npy array: .*write_array"):
            np.asarray(owner)  # not a 0-d array of objects


# -- allocate_array ---------------------------------------------------------------------


def fill_bytes(out, value: int) -> None:
    """Set every byte of a C-contiguous array in place, and check that it took."""
    out.reshape(-1).view(np.uint8)[...] = value
    assert out.tobytes() == bytes([value]) * out.nbytes


def assert_filled_round_trip(builder, shape, dtype, fill: int) -> None:
    """Fill the builder's array with one byte value, seal it, and read it back both ways."""
    out = builder.array()
    assert out.shape == shape and out.dtype == dtype
    fill_bytes(out, fill)
    snapshot = out.copy()
    del out
    page = builder.seal()
    assert same(np.load(page.path, mmap_mode="r"), snapshot)
    assert same(page.array(), snapshot)


def test_allocate_array_fill_and_seal(cache):
    builder = cache.allocate_array((3, 4), np.float32)
    out = builder.array()
    assert out.flags.writeable and out.flags.c_contiguous
    assert out.shape == (3, 4) and out.dtype == np.float32
    assert not out.any()  # zero-filled
    out[...] = np.arange(12, dtype=np.float32).reshape(3, 4)
    del out
    page = builder.seal()
    expected = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert page.nbytes == os.stat(page.path).st_size == 128 + expected.nbytes
    assert same(np.load(page.path, mmap_mode="r"), expected)
    got = page.array()
    assert same(got, expected) and not got.flags.writeable


@pytest.mark.parametrize(
    "shape, dtype",
    [
        (5, "f8"),
        ((), "i4"),
        ((0,), "f8"),
        ((2, 0, 3), "u1"),
        ([np.int64(2), 3], ">c16"),
        ((2,), STRUCTURED),
        ((3,), "U4"),
        ((2,), "datetime64[ms]"),
        ((2, 2), np.dtype([])),
    ],
)
def test_allocate_array_shapes_and_dtypes(cache, shape, dtype):
    expected_shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    assert_filled_round_trip(cache.allocate_array(shape, dtype), expected_shape, np.dtype(dtype), 0xAB)


def test_allocate_array_subarray_dtype_adds_dimensions(cache):
    out = cache.allocate_array(2, ("f8", (3,))).array()
    assert out.shape == (2, 3) and out.dtype == np.float64


def test_seal_refused_while_an_array_is_alive(cache):
    builder = cache.allocate_array(10, np.int64)
    out = builder.array()
    part = out[2:5]  # a view of the array holds the mapping too
    del out
    with pytest.raises(BufferError, match=r"view or array of page \d+ is still alive.* drop it \(del\)"):
        builder.seal()
    assert not builder.sealed
    part[...] = 9
    del part
    page = builder.seal()
    assert page.array()[2:5].tolist() == [9, 9, 9]
    with pytest.raises(ValueError, match="sealed"):
        builder.array()


def test_unsealed_array_builder_leaves_no_file(cache):
    builder = cache.allocate_array((100, 100), np.float64)
    builder.array()[...] = 1.0
    assert cache.stats().live_pages == 1  # (whether its file has a name yet is not the point)
    del builder
    cache.remove_released()
    assert os.listdir(cache.path) == []
    assert cache.stats().live_pages == 0


@pytest.mark.parametrize(
    "shape, dtype, exc",
    [
        ("abc", "f8", TypeError),
        (1.5, "f8", TypeError),
        ([2, 1.5], "f8", TypeError),
        (None, "f8", TypeError),
        (True, "f8", TypeError),
        ([2, True], "f8", TypeError),
        (-1, "f8", ValueError),
        ((3, -2), "f8", ValueError),
        ((2**40, 2**40), "f8", ValueError),
        (3, "not a dtype", TypeError),
        (3, object, TypeError),
        (3, [("a", "f8"), ("b", "O")], TypeError),
    ],
)
def test_allocate_array_bad_arguments(cache, shape, dtype, exc):
    with pytest.raises(exc):
        cache.allocate_array(shape, dtype)
    assert os.listdir(cache.path) == []
    assert cache.stats().live_pages == 0


# -- properties -------------------------------------------------------------------------

plain_dtypes = hnp.scalar_dtypes() | hnp.byte_string_dtypes(min_len=1) | hnp.unicode_string_dtypes(min_len=1)
# hypothesis' array_dtypes draws any text as field names; .npy formats 1.0 and 2.0 hold latin-1
fields = st.tuples(
    st.text(string.ascii_letters, min_size=1, max_size=6),
    plain_dtypes,
    hnp.array_shapes(min_dims=0, max_dims=2, max_side=2),
)
structured_dtypes = st.lists(fields, min_size=1, max_size=4, unique_by=lambda f: f[0]).map(np.dtype)
dtypes = plain_dtypes | structured_dtypes
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
layouts = st.sampled_from(["C", "F", "strided"])


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_array_round_trips(tmp_path_factory, data):
    dtype = data.draw(dtypes, label="dtype")
    array = data.draw(hnp.arrays(dtype, data.draw(shapes, label="shape")), label="array")
    layout = data.draw(layouts, label="layout")
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided":
        array = array[tuple(slice(None, None, 2) for _ in range(array.ndim))]
    with PageCache(tmp_path_factory.getbasetemp() / "prop-arrays") as cache:
        assert_round_trip(cache, array)


@settings(max_examples=40, deadline=None)
@given(dtype=dtypes, shape=shapes, fill=st.integers(0, 255))
def test_any_allocated_array_round_trips(tmp_path_factory, dtype, shape, fill):
    with PageCache(tmp_path_factory.getbasetemp() / "prop-arrays") as cache:
        assert_filled_round_trip(cache.allocate_array(shape, dtype), shape, dtype, fill)


# -- the C gather write and its failures ----------------------------------------------------


def test_write_parts_with_many_and_empty_parts(cache):
    rng = np.random.default_rng(5)
    parts = [rng.bytes(int(n)) for n in rng.integers(0, 40, size=1500)]  # over IOV_MAX (1024)
    parts[0] = parts[-1] = b""
    from diskpages import Page

    page = Page._empty(cache)
    page._id, page._nbytes = _bindings.write_parts(cache._handle, parts, str(cache.path), page._hold, False)
    assert page.nbytes == sum(map(len, parts))
    assert page.read() == b"".join(parts)
    empty = Page._empty(cache)
    empty._id, empty._nbytes = _bindings.write_parts(cache._handle, [], str(cache.path), empty._hold, False)
    assert empty.nbytes == 0 and empty.read() == b""


def test_write_array_that_fails_midway_leaves_no_file(root):
    proc = run_python(f"""
        import errno, os, resource
        import numpy as np
        from diskpages import PageCache
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        c = PageCache({str(root)!r})
        for call in (lambda: c.write_array(np.zeros(20000)), lambda: c.allocate_array(20000, "f8"),
                     lambda: c.write_array(np.zeros(40000)[::2])):  # strided: pwrite, no mapping
            try:
                call()
            except OSError as e:
                assert e.errno == errno.EFBIG, e
                assert e.filename == str(c.path), e.filename
                assert os.listdir(c.path) == [], os.listdir(c.path)
            else:
                raise AssertionError("did not fail")
        assert c.write_array(np.arange(10)).array().sum() == 45  # the cache still works
        print("ok")
        c.close()
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert files_in(root) == []


def test_write_array_into_closed_cache(root):
    from diskpages import CacheClosedError

    cache = PageCache(root)
    cache.close()
    with pytest.raises(CacheClosedError):
        cache.write_array(np.arange(3))
    with pytest.raises(CacheClosedError):
        cache.allocate_array(3, "f8")


# -- without NumPy ----------------------------------------------------------------------


def test_diskpages_does_not_import_numpy():
    proc = run_python("""
        import sys
        import diskpages
        assert "numpy" not in sys.modules, "importing diskpages imported numpy"
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


def test_everything_else_works_without_numpy(root):
    proc = run_python(f"""
        import sys
        sys.modules["numpy"] = None  # import numpy now raises ImportError
        from diskpages import PageCache
        with PageCache({str(root)!r}) as cache:
            page = cache.write(b"bytes still work")
            assert page.read() == bytes(page.view()) == b"bytes still work"
            builder = cache.allocate(4)
            builder.view()[:] = b"abcd"
            assert builder.seal().read() == b"abcd"
            assert [p.read() for p in cache.write_many([b"a", b"b"])] == [b"a", b"b"]
            builder = cache.allocate(4)
            written = cache.stats().written
            calls = {{
                "write_array": lambda: cache.write_array([1, 2]),
                "allocate_array": lambda: cache.allocate_array(3, "f8"),
                "Page.array": page.array,
                "PageBuilder.array": builder.array,
            }}
            for name, call in calls.items():
                try:
                    call()
                except ImportError as e:
                    assert 'pip install "diskpages[numpy]"' in str(e), (name, e)
                    print(name, "ImportError")
                else:
                    raise AssertionError(name + " worked without numpy")
            assert cache.stats().written == written  # the refused calls made no page
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n") == [
        "write_array ImportError",
        "allocate_array ImportError",
        "Page.array ImportError",
        "PageBuilder.array ImportError",
        "",
    ]
    assert files_in(root) == []


def test_array_page_pickles_to_a_borrower_in_another_process(cache):
    page = cache.write_array(np.arange(12, dtype=">f8").reshape(3, 4))
    code = (
        "import pickle, sys, numpy as np; p = pickle.loads(sys.stdin.buffer.read()); a = p.array(); "
        "assert not a.flags.writeable; print(a.dtype.str, a.shape, float(a.sum()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(page), capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == [">f8", "(3,", "4)", "66.0"]
    assert page.path.exists()  # the borrower's exit left the owner's file alone
    assert cache.stats().live_bytes == page.nbytes == os.path.getsize(page.path)


# -- hostile .npy headers: ValueError, whatever numpy's header parser raises ------------------


def npy_of(header: bytes, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy magic, the header's length as that format version writes it, header, data."""
    return b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(2 * version, "little") + header + data


def page_and_builder(cache, raw: bytes):
    """The bytes as a sealed Page and as an unsealed PageBuilder: array() parses both alike."""
    builder = cache.allocate(len(raw))
    with builder.view() as view:
        view[:] = raw
    return cache.write(raw), builder


def header_dict(descr: str, shape: str) -> bytes:
    return f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()


# Each once raised something other than ValueError from page.array() (numpy 2.4, CPython 3.11).
HOSTILE_HEADERS = {
    # tokenize.TokenError: numpy retries a header literal_eval refuses with tokenize (for
    # Python 2's "1L"), which raises its own error on an unclosed bracket or string
    "cut short": (b"{'descr': '<f8', 'fortran_order': False, 'shape': (", b""),
    "unclosed bracket": (b"{", b""),
    "unclosed triple quote": (b"'''", b""),
    # IndentationError (a SyntaxError), from the same tokenize pass
    "bad dedent": (b"\t{'descr': '<f8'}\n  x", b""),
    # SyntaxError: numpy.dtype parses a descr like "(3,)f8" with literal_eval
    "descr with an unclosed (": (header_dict("'(3,)f8,('", "(1,)"), b""),
    # TypeError: literal_eval builds a dict or set with an unhashable key
    "list as a key": (b"{[1]: 2}", b""),
    "dict in a set": (b"{{}}", b""),
    # IndexError: numpy.lib.format.descr_to_dtype indexes a tuple descr
    "descr a 1-tuple": (header_dict("('<f8',)", "(1,)"), b""),
    "descr an empty tuple": (header_dict("()", "(1,)"), b""),
    # RecursionError: the AST of a 6 KB header is deeper than ast allows
    "deep binary operators": (b"1+" * 3000 + b"1", b""),
    # MemoryError: CPython 3.11's parser reports nesting deeper than its stack as one
    "deep unary minus": (b"-" * 6000 + b"1", b""),
    # TypeError: a bool is an int to numpy's header check, but not a size to reshape
    "bool in shape": (header_dict("'<f8'", "(True,)"), b"\0" * 8),
    # ValueError, but from reshape or numpy.empty, not naming the page
    "negative sizes": (header_dict("'<f8'", "(-1, -1)"), b"\0" * 8),
    "negative size, empty dtype": (header_dict("'|V0'", "(-1,)"), b""),
    "size over intp": (header_dict("'<f8'", f"(0, {2**63})"), b""),
    "over 64 dimensions": (header_dict("'<f8'", "(" + "1, " * 65 + ")"), b"\0" * 8),
}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", list(HOSTILE_HEADERS))
def test_array_of_hostile_header_is_a_value_error(cache, name, version):
    header, data = HOSTILE_HEADERS[name]
    for owner in page_and_builder(cache, npy_of(header, data, version)):
        with pytest.raises(ValueError, match=f"^page {owner.id} is not a .npy array: "):
            owner.array()


# Pieces of headers, so that random ones are often nearly valid, not only noise.
HEADER_PIECES = (
    ["{", "}", "(", ")", "[", "]", ":", ",", " ", "\n", "\t", "\\", "'", '"', "'''", "\x00", "\xe9"]
    + ["1", "-1", "0", "1L", "True", "False", "-", "+", "not ", "'descr'", "'fortran_order'", "'shape'"]
    + ["'<f8'", "'|V0'", "'(3,)f8'", "('<f8',)", "[('a', '<f8')]", "{'descr': '<f8', 'fortran_order': False"]
)
random_headers = st.binary(max_size=120) | st.lists(st.sampled_from(HEADER_PIECES), max_size=30).map(
    lambda pieces: "".join(pieces).encode("latin-1")
)


@settings(max_examples=200, deadline=None)
@given(header=random_headers, data=st.binary(max_size=16), version=st.sampled_from([1, 2]))
def test_array_of_random_header_is_an_array_or_a_value_error(tmp_path_factory, header, data, version):
    with PageCache(tmp_path_factory.getbasetemp() / "prop-headers") as cache:
        for owner in page_and_builder(cache, npy_of(header, data, version)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # numpy's "created on Python 2" for "1L"
                    owner.array()
            except ValueError as exc:
                assert str(exc).startswith(f"page {owner.id} "), exc
