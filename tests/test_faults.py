"""Every failure path: bad arguments, unusable roots, full files and disks, lost files."""

import errno
import gc
import os
import shutil
import subprocess
import uuid

import pytest

from diskpages import PageCache, PageLostError

from conftest import files_in, page_count_on_disk, run_python


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"sync": "fast"}, ValueError),
        ({"sync": None}, ValueError),
        ({"batch": 0}, ValueError),
        ({"batch": -3}, ValueError),
        ({"batch": 1.5}, TypeError),
        ({"batch": True}, TypeError),
        ({"max_delay": 0}, ValueError),
        ({"max_delay": -1.0}, ValueError),
        ({"max_delay": float("nan")}, ValueError),
        ({"max_delay": float("inf")}, ValueError),
        ({"max_delay": "1"}, TypeError),
    ],
)
def test_bad_arguments(root, kwargs, exc):
    with pytest.raises(exc):
        PageCache(root, **kwargs)
    assert files_in(root) == []  # nothing half made


def test_bad_remover_setting(root, monkeypatch):
    monkeypatch.setenv("DISKPAGES_REMOVER", "magic")
    with pytest.raises(ValueError):
        PageCache(root)


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(OSError) as info:
        PageCache(f)
    assert str(f) in str(info.value)
    with pytest.raises(NotADirectoryError) as info:
        PageCache(f / "below")
    assert str(f) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_root_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError) as info:
        PageCache(locked / "root")
    assert str(locked) in str(info.value)


FSIZE = """
    import errno, os, resource
    from diskpages import PageCache, _bindings
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    c = PageCache({root!r}, pack_max=0)  # files: a segment is bigger than the limit
    def check(what, call):
        try:
            call()
        except OSError as e:
            assert e.errno == errno.EFBIG, (what, e)
            assert e.filename == str(c.path), (what, e.filename)
            assert os.listdir(c.path) == [], (what, os.listdir(c.path))
            print(what, "EFBIG")
        else:
            raise AssertionError(what + " did not fail")
    check("write", lambda: c.write(b"x" * 200000))
    check("write_many", lambda: c.write_many([b"a" * 10, b"b" * 10, b"c" * 200000, b"d"]))
    check("allocate", lambda: c.allocate(200000))
    c._write_method = _bindings.WRITE_METHODS["mmap"]
    check("mmap write", lambda: c.write(b"x" * 200000))
    c._write_method = _bindings.WRITE_METHODS["pwrite"]
    page = c.write(b"fits")
    assert page.read() == b"fits"
    s = c.stats()
    assert (s.live_pages, s.written) == (1, 1), s
    print("ok")
"""


def test_write_that_fails_midway_leaves_no_file(root):
    proc = run_python(FSIZE.format(root=str(root)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n") == [
        "write EFBIG",
        "write_many EFBIG",
        "allocate EFBIG",
        "mmap write EFBIG",
        "ok",
        "",
    ]
    assert files_in(root) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be made."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a tiny file system")
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    options = "size=1m,mode=0700"  # a root others can write to would be refused
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.usefixtures("packing")
def test_full_disk_raises_enospc_and_leaves_nothing(tiny_tmpfs, packing):
    with PageCache(tiny_tmpfs) as c:
        for call in (
            lambda: c.write(b"z" * (2 << 20)),
            lambda: c.write_many([b"y" * 4096, b"z" * (2 << 20)]),
            lambda: c.allocate(2 << 20),
        ):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.ENOSPC
            if packing == "files":
                assert os.listdir(c.path) == []
            else:  # (the segment of the 4 KiB page may stay, empty)
                assert page_count_on_disk(c) == 0
        # The cache still works: a segment that has no room for a 1 MiB chunk grows by
        # one slot, so a small page fits wherever a 4 KiB file would.
        page = c.write(b"small")
        assert page.read() == b"small"


def test_vanished_file_raises_page_lost(root):
    cache = PageCache(root, max_delay=30.0, pack_max=0)  # a page file that vanishes
    page = cache.write(b"here")
    os.unlink(page.path)
    with pytest.raises(PageLostError):
        page.read()
    with pytest.raises(PageLostError):
        page.view()
    page.release()
    assert cache.remove_released() == 1
    assert cache.stats().remove_errors == 0  # already gone counts as removed
    cache.close()


def test_file_of_wrong_size_is_refused_not_mapped(root):
    cache = PageCache(root, pack_max=0)  # a page file someone truncates
    page = cache.write(b"x" * 8192)
    os.truncate(page.path, 100)  # a view of this would fault past the end (SIGBUS)
    with pytest.raises(PageLostError):
        page.view()
    with pytest.raises(PageLostError):
        page.read()
    cache.close()


def test_folder_removed_under_the_cache(root):
    cache = PageCache(root, pack_max=0)  # (an open segment would still take small pages)
    page = cache.write(b"p")
    shutil.rmtree(cache.path)
    with pytest.raises(FileNotFoundError):
        cache.write(b"q")
    with pytest.raises(PageLostError):
        page.read()
    cache.close()  # the folder is already gone: nothing left to do, no error
    assert cache.closed


def test_builder_whose_mapping_fails_leaves_no_file(cache, monkeypatch):
    import diskpages._views as views_module

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(views_module.mmap, "mmap", no_memory)
    with pytest.raises(OSError) as info:
        cache.allocate(4096)
    assert info.value.errno == errno.ENOMEM
    monkeypatch.undo()
    cache.remove_released()
    assert os.listdir(cache.path) == []
    assert cache.stats().live_pages == 0


def test_a_removal_that_fails_is_counted_and_its_bytes_stay_charged(root):
    from diskpages import CacheFullError

    cache = PageCache(root, max_bytes=8192, max_delay=3600, pack_max=0)  # a file's unlink fails
    page = cache.write(b"a" * 4096)
    path = page.path
    os.unlink(path)
    os.mkdir(path)  # a non-empty folder under the page's name: unlinkat fails (EISDIR)
    (path / "x").write_bytes(b"")
    page.release()
    assert cache.remove_released() == 0  # nothing went
    s = cache.stats()
    assert (s.remove_errors, s.removed, s.pending, s.live_bytes, s.charged_bytes) == (1, 0, 0, 0, 4096)
    cache.write(b"b" * 4096).release()  # what is left of the budget still takes a page
    assert cache.remove_released() == 1
    with pytest.raises(CacheFullError, match="4096 in files that could not be removed"):
        cache.write(b"c" * 4097)
    with pytest.raises(IsADirectoryError):
        cache.close()  # close says so, and can be tried again
    shutil.rmtree(path)
    cache.close()
    assert not root.joinpath(cache.path.name).exists()
    assert cache.stats().charged_bytes == 0


def open_fds() -> int:
    """This process's open fds, once the collector has closed those of unreachable caches
    left by earlier tests (else an automatic collection could close some mid-test)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.usefixtures("packing")
def test_view_whose_mapping_fails_raises_and_leaks_no_fd(cache, monkeypatch):
    import pickle

    from diskpages import _bindings

    page = cache.write(b"v" * 8192)
    borrowed = pickle.loads(pickle.dumps(page))
    fds = open_fds()

    def refused(fd_or_pin, target, nbytes, path, align=1):
        raise OSError(errno.ENOMEM, "Cannot allocate memory", path)

    monkeypatch.setattr(_bindings, "pin_map", refused)  # a page's own view
    monkeypatch.setattr(_bindings, "map_fixed", refused)  # a borrower's (a file's: zero-copy)
    for _ in range(20):
        with pytest.raises(OSError):
            page.view()
        if not page.packed:  # (a borrowed slot is a checked copy: nothing to map)
            with pytest.raises(OSError):
                borrowed.view()
    assert open_fds() == fds
    monkeypatch.undo()
    assert page.view() == b"v" * 8192 and borrowed.view() == b"v" * 8192
    page.release()
    cache.remove_released()
    s = cache.stats()
    assert (s.pinned, s.charged_bytes) == (0, 0), s  # the failed views' pins went too


def test_cache_that_fails_to_open_leaves_no_folder(root, monkeypatch):
    from diskpages import _bindings
    from diskpages._native import ffi, lib

    def refused(*args):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(_bindings, "cache_create", refused)
    fds = open_fds()
    with pytest.raises(OSError):
        PageCache(root)
    assert files_in(root) == []
    assert open_fds() == fds  # the root's fd was closed too
    # and C's own refusal, after the root is open: no folder, no fd
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    out, name = ffi.new("dp_hold *"), ffi.new("char[32]")
    assert lib.dp_cache_create(root_fd, 3, 1, 1, lib.DP_REMOVE_AUTO, 0, 0, out, name) == -errno.EINVAL
    assert out.ptr == ffi.NULL and files_in(root) == []
    os.close(root_fd)
    assert open_fds() == fds


def test_c_layer_refuses_bad_arguments(tmp_path):
    from diskpages._native import ffi, lib

    out = ffi.new("dp_hold *")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bad = [
            (3, 1, 1, lib.DP_REMOVE_AUTO, 0),
            (0, 0, 1, lib.DP_REMOVE_AUTO, 0),
            (0, 1, 0, lib.DP_REMOVE_AUTO, 0),
            (0, 1, 1, -1, 0),
            (0, 1, 1, 7, 0),
            (0, 1, 1, lib.DP_REMOVE_AUTO, lib.DP_PACK_LIMIT + 1),
        ]
        for sync, batch, delay, remover, pack_max in bad:
            assert lib.dp_cache_open(fd, sync, batch, delay, remover, 0, pack_max, out) == -errno.EINVAL
            assert out.ptr == ffi.NULL  # nothing handed over
    finally:
        os.close(fd)  # on failure the fd stays the caller's


def test_write_many_failure_names_the_buffer(root):
    proc = run_python(f"""
        import errno, os, resource
        from diskpages import PageCache
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        c = PageCache({str(root)!r}, pack_max=0)  # files: a segment is bigger than the limit
        try:
            c.write_many([b"a", b"b", b"c" * 200000])
        except OSError as e:
            assert e.errno == errno.EFBIG
            print(e.__notes__[0])
        c.close()
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "writing buffer 2 of 3; no page of this call was kept"
