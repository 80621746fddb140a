"""The public API behaves as documented: round trips, sizes, types, builders, stats."""

import array
import copy
import os
import pickle
import stat

import pytest

import diskpages
from diskpages import (
    CacheClosedError,
    Page,
    PageBuilder,
    PageCache,
    PageCacheError,
    PageLostError,
    PageReleasedError,
    _bindings,
)

from conftest import on_disk, page_count_on_disk


@pytest.mark.usefixtures("packing")
def test_write_read_view_round_trip(cache, packing):
    page = cache.write(b"hello pages")
    assert isinstance(page, Page)
    assert page.read() == b"hello pages"
    view = page.view()
    assert isinstance(view, memoryview) and view.readonly
    assert bytes(view) == b"hello pages"
    assert page.nbytes == len(page) == 11
    assert page.packed == (packing == "packed")
    if packing == "files":
        assert page.path.parent == cache.path
        assert page.path.read_bytes() == b"hello pages"
    else:  # a slot of a segment file: no file of its own
        with pytest.raises(ValueError, match="packed"):
            page.path  # noqa: B018
        assert pickle.loads(pickle.dumps(page)).read() == b"hello pages"  # read from the segment
    assert isinstance(page.id, int)


@pytest.mark.parametrize(
    "data",
    [b"abc", bytearray(b"abcd"), memoryview(b"abcdef")[1:4], array.array("d", [1.5, -2.0])],
    ids=["bytes", "bytearray", "memoryview", "array"],
)
def test_accepts_bytes_like(cache, data):
    page = cache.write(data)
    assert page.read() == bytes(memoryview(data).cast("B"))


def test_accepts_numpy_arrays(cache):
    np = pytest.importorskip("numpy")
    arr = np.arange(1000, dtype=np.float64)
    page = cache.write(arr)
    assert page.nbytes == arr.nbytes
    assert np.array_equal(np.frombuffer(page.view(), dtype=np.float64), arr)


@pytest.mark.parametrize("bad", ["text", 3, None, [1, 2], 1.5, object()])
def test_rejects_non_buffers_with_type_error(cache, bad):
    with pytest.raises(TypeError):
        cache.write(bad)
    with pytest.raises(TypeError):
        cache.write_many([b"ok", bad])
    assert os.listdir(cache.path) == []


def test_rejects_non_contiguous(cache):
    with pytest.raises(BufferError):
        cache.write(memoryview(b"abcdef")[::2])
    assert os.listdir(cache.path) == []


@pytest.mark.usefixtures("packing")
def test_empty_page(cache, packing):
    page = cache.write(b"")
    assert page.nbytes == 0
    assert page.read() == b""
    assert bytes(page.view()) == b""
    if packing == "files":  # pack_max=0: a file per page, the empty one too
        assert not page.packed
        assert page.path.exists() and page.path.stat().st_size == 0
    else:
        assert page.packed and page_count_on_disk(cache) == 1
        assert pickle.loads(pickle.dumps(page)).read() == b""


def test_large_page(cache):
    data = os.urandom(3 * 1024 * 1024 + 17)
    page = cache.write(data)
    assert page.read() == data
    assert page.view() == data


def file_mappings(path) -> list[tuple[int, int]]:
    """(start, end) of each mapping of path in this process."""
    with open("/proc/self/maps") as f:
        spans = [line.split()[0] for line in f if str(path) in line]  # "(deleted)" too
    return [tuple(int(x, 16) for x in span.split("-")) for span in spans]


# (not a multiple of 2 MiB: the kernel aligns anonymous mappings of such lengths itself)
@pytest.mark.parametrize("nbytes", [2 * 1024 * 1024 + 1, 5 * 1024 * 1024 + 3])
def test_large_views_start_on_a_2mib_boundary(cache, nbytes):
    # so that the kernel can fault the file in as 2 MiB folios (as for its own file mappings)
    page = cache.write(b"v" * nbytes)
    views = [page.view() for _ in range(3)]
    spans = file_mappings(page.path)
    assert len(spans) == 3
    assert all(start % (2 * 1024 * 1024) == 0 and end - start >= nbytes for start, end in spans)
    assert all(len(v) == nbytes and v.readonly and v[-1:] == b"v" for v in views)
    page.release()
    cache.remove_released()
    assert all(v[:1] == b"v" for v in views)  # a view outlives its page
    del views
    assert file_mappings(page.path) == []  # and the mapping goes with its last view


@pytest.mark.usefixtures("packing")
def test_files_are_private(cache):
    cache.write(b"x")  # a page file, or a slot of a segment file
    cache.allocate(1).seal()  # a page file either way
    assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o700
    names = os.listdir(cache.path)
    assert len(names) == 2, names
    for name in names:
        assert stat.S_IMODE(os.stat(cache.path / name).st_mode) == 0o600, name


def test_write_many_in_order(cache):
    datas = [os.urandom(n) for n in (0, 1, 4096, 70000)]
    pages = cache.write_many(datas)
    assert [p.read() for p in pages] == datas
    assert len({p.id for p in pages}) == len(datas)
    assert cache.write_many([]) == []
    assert cache.write_many(iter([b"g"]))[0].read() == b"g"


@pytest.mark.parametrize("sync", ["none", "data", "full"])
def test_every_sync_mode_writes(root, sync):
    with PageCache(root, sync=sync) as c:
        assert c.sync == sync
        assert c.write(b"s" * 5000).read() == b"s" * 5000
        assert [p.read() for p in c.write_many([b"a", b"b"])] == [b"a", b"b"]
        b = c.allocate(3)
        b.view()[:] = b"xyz"
        assert b.seal().read() == b"xyz"


def test_mmap_write_method_round_trip(cache):
    cache._write_method = diskpages._bindings.WRITE_METHODS["mmap"]
    data = os.urandom(200_000)
    assert cache.write(data).read() == data
    assert cache.write(b"").read() == b""


def test_allocate_fills_in_place(cache):
    builder = cache.allocate(8)
    assert isinstance(builder, PageBuilder) and not builder.sealed
    view = builder.view()
    assert not view.readonly
    assert bytes(view) == bytes(8)
    view[:] = b"01234567"
    del view
    page = builder.seal()
    assert builder.sealed
    assert page.read() == b"01234567"
    assert page.id == builder.id and page.path == builder.path
    with pytest.raises(ValueError):
        builder.view()
    with pytest.raises(ValueError):
        builder.seal()


def test_seal_refuses_while_a_view_is_alive(cache):
    builder = cache.allocate(4)
    view = builder.view()
    part = view[1:3]  # a slice holds the export too
    del view
    with pytest.raises(
        BufferError, match=r"view .*of page \d+ is still alive.* drop it \(del\).* before seal\(\)"
    ):
        builder.seal()
    part[:] = b"zz"  # the builder is still usable
    del part
    assert builder.seal().read() == b"\0zz\0"


def test_allocate_zero_bytes(cache):
    builder = cache.allocate(0)
    assert len(builder.view()) == 0
    assert builder.seal().read() == b""


def test_allocate_bad_sizes(cache):
    with pytest.raises(ValueError):
        cache.allocate(-1)
    with pytest.raises(TypeError):
        cache.allocate(1.0)
    with pytest.raises(TypeError):
        cache.allocate("10")
    assert os.listdir(cache.path) == []


def test_unsealed_builder_leaves_no_file(cache):
    builder = cache.allocate(4096)
    path = builder.path
    view = builder.view()
    view[:4] = b"abcd"
    assert not path.exists() and os.listdir(cache.path) == []  # nameless until sealed
    assert cache.stats().live_bytes == 4096  # but counted from allocate on
    del builder
    cache.remove_released()
    assert not path.exists() and os.listdir(cache.path) == []
    assert cache.stats().live_bytes == 0
    assert bytes(view[:4]) == b"abcd"  # the mapping outlives the file


def test_builder_as_a_context_manager_seals_or_discards(cache):
    with cache.allocate(4) as builder:
        builder.view()[:] = b"abcd"
        page = builder.seal()
    assert page.read() == b"abcd" and builder.sealed  # sealed in the block: the page stays
    with cache.allocate(4096) as builder:  # left without seal(): discarded
        builder.view()[:4] = b"abcd"
    with pytest.raises(PageReleasedError, match="discarded"):
        builder.seal()
    cache.remove_released()
    assert cache.stats().live_pages == 1 and cache.stats().charged_bytes == 4096  # a block
    assert page_count_on_disk(cache) == 1  # nothing of the builder: only the page sealed above
    del page


def test_builder_left_by_an_exception_is_discarded_and_the_exception_goes_on(cache):
    with pytest.raises(KeyError, match="boom"):
        with cache.allocate(4096) as builder:
            builder.view()[:4] = b"abcd"
            raise KeyError("boom")
    with pytest.raises(PageReleasedError):
        builder.view()
    view = None
    with pytest.raises(BufferError):  # seal() itself fails: discarded all the same
        with cache.allocate(10) as builder:
            view = builder.view()
            builder.seal()
    view[:2] = b"ok"  # the view keeps its mapping; the page is gone
    assert not builder.sealed
    cache.remove_released()
    assert cache.stats().live_pages == 0 and os.listdir(cache.path) == []


def test_release_is_idempotent_and_context_manager(cache):
    with cache.write(b"abc") as page:
        assert not page.released
        assert page.read() == b"abc"
        where = on_disk(page)
    assert page.released
    page.release()
    page.release()
    with pytest.raises(PageReleasedError):
        page.read()
    with pytest.raises(PageReleasedError):
        page.view()
    assert cache.remove_released() == 1
    assert not where.exists()


def test_stats_count_pages(cache):
    a = cache.write(b"x" * 10)
    b = cache.write(b"y" * 20)
    s = cache.stats()
    assert (s.live_pages, s.live_bytes, s.pending, s.removed, s.written) == (2, 30, 0, 0, 2)
    # charged what they take on disk: a 4 KiB slot, or a file's one 4 KiB block, each
    assert s.charged_bytes == s.live_disk_bytes == 8192
    a.release()
    s = cache.stats()
    assert (s.live_pages, s.live_bytes, s.pending, s.pending_bytes, s.charged_bytes) == (1, 20, 1, 10, 8192)
    assert (s.live_disk_bytes, s.pending_disk_bytes) == (4096, 4096)
    cache.remove_released()
    s = cache.stats()
    assert (s.live_pages, s.pending, s.removed, s.charged_bytes) == (1, 0, 1, 4096)
    assert s.remover in ("io_uring", "loop")
    del b


def test_close_removes_everything(root):
    cache = PageCache(root)
    pages = [cache.write(b"p" * 100) for _ in range(5)]
    builder = cache.allocate(10)
    view = pages[0].view()
    cache.close()
    assert cache.closed
    assert not cache.path.exists()
    assert root.exists() and os.listdir(root) == []
    assert all(p.released for p in pages)
    with pytest.raises(PageReleasedError):
        pages[1].read()
    with pytest.raises(CacheClosedError):
        cache.write(b"late")
    with pytest.raises(CacheClosedError):
        cache.write_many([b"late"])
    with pytest.raises(CacheClosedError):
        cache.allocate(1)
    with pytest.raises(CacheClosedError):
        builder.seal()
    assert bytes(view) == b"p" * 100
    assert cache.remove_released() == 0
    cache.close()  # idempotent
    del pages, builder


def test_context_manager_closes(root):
    with PageCache(root) as cache:
        cache.write(b"x")
        path = cache.path
    assert cache.closed and not path.exists()


def test_cache_closes_when_collected(root):
    cache = PageCache(root)
    page = cache.write(b"abc")
    path = cache.path
    del cache
    assert path.exists()  # the page keeps its cache alive
    assert page.read() == b"abc"
    del page
    assert not path.exists()


def test_error_tree():
    for exc in (CacheClosedError, PageReleasedError, PageLostError):
        assert issubclass(exc, PageCacheError)
    assert not issubclass(PageCacheError, OSError)


def test_pages_cannot_be_constructed_copied_wrongly_or_pickled(cache):
    with pytest.raises(TypeError):
        Page()
    with pytest.raises(TypeError):
        PageBuilder()
    page = cache.write(b"abc")
    assert copy.copy(page) is page and copy.deepcopy(page) is page
    with pytest.raises(TypeError, match="seal"):
        pickle.dumps(cache.allocate(1))
    assert "Page" in repr(page) and "PageCache" in repr(cache)


def test_default_root_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("DISKPAGES_ROOT", raising=False)
    root = diskpages.default_root()
    assert root.name == f"diskpages-{os.getuid()}"
    monkeypatch.setenv("DISKPAGES_ROOT", str(tmp_path / "env-root"))
    with PageCache() as c:
        assert c.path.parent == tmp_path / "env-root"
        assert stat.S_IMODE(os.stat(c.path.parent).st_mode) == 0o700


def test_allocate_reserves_the_blocks(cache):
    builder = cache.allocate(1 << 20)
    # fallocate'd: filling the mapping cannot meet ENOSPC (a SIGBUS, not an error)
    assert os.fstat(_bindings.builder_fd(builder._hold)).st_blocks * 512 >= 1 << 20


@pytest.mark.usefixtures("packing")
def test_relative_root_survives_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = PageCache("rel-root")
    page = cache.write(b"abc")
    borrowed = pickle.dumps(page)  # names the page's file, or its segment
    assert cache.path.is_absolute()
    monkeypatch.chdir("/")
    if not page.packed:
        assert page.path.read_bytes() == b"abc"
    assert pickle.loads(borrowed).read() == b"abc"
    cache.close()
    assert os.listdir(tmp_path / "rel-root") == []


def test_close_from_many_threads_returns_when_the_folder_is_gone(root):
    import threading

    def close_and_look(cache, gone):
        cache.close()
        gone.append(not cache.path.exists())

    for _ in range(5):
        cache = PageCache(root)
        pages = cache.write_many([b"x" * 4096] * 300)  # live pages: close has files to remove
        gone: list[bool] = []
        threads = [threading.Thread(target=close_and_look, args=(cache, gone)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert gone == [True] * 4
        del pages


def test_failed_close_can_be_retried(root):
    cache = PageCache(root)
    cache.write(b"x")
    (cache.path / "intruder").mkdir()  # a folder the cache cannot unlink
    with pytest.raises(OSError):
        cache.close()
    assert cache.closed and cache.path.exists()
    (cache.path / "intruder").rmdir()
    cache.close()
    assert not cache.path.exists()


def test_builder_resize_through_view_object_is_safe(cache):
    builder = cache.allocate(4096)
    mapping = builder.view().obj  # the mmap object behind the views
    mapping.resize(4 * 4096)  # grows the file along with the mapping: no SIGBUS
    mapping[3 * 4096] = 1
    assert os.fstat(_bindings.builder_fd(builder._hold)).st_size == 4 * 4096


def test_seal_failure_leaves_builder_usable(root, monkeypatch):
    cache = PageCache(root, sync="full")
    builder = cache.allocate(4096)
    builder.view()[:3] = b"abc"

    def failing_seal(*args):
        raise OSError(5, "Input/output error", args[-1])

    monkeypatch.setattr(diskpages._bindings, "seal", failing_seal)
    with pytest.raises(OSError):
        builder.seal()
    assert not builder.sealed
    assert bytes(builder.view()[:3]) == b"abc" and len(builder.view()) == 4096
    monkeypatch.undo()
    assert builder.seal().read()[:3] == b"abc"
    cache.close()
