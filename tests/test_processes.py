"""Pages across processes: forks borrow, pickles borrow, killed processes are swept, and
nothing is printed or left at exit. Every test runs real processes, and (the `packing`
fixture) for pages with files of their own and for packed pages alike, unless it says
otherwise."""

import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import diskpages
from diskpages import BorrowedPage, PageCache, PageLostError, PageReleasedError, UnsafeRootError

from conftest import (
    files_in,
    files_only,
    on_disk,
    packing_irrelevant,
    page_count_on_disk,
    run_python,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("packing")

# For the scripts below: pages on disk in a folder, as page_count_on_disk counts them.
COUNT = """
def page_count_on_disk(folder):
    from diskpages._folders import _contents
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _contents(fd)[0]
    finally:
        os.close(fd)
"""


def run_script(tmp_path, code, *args, timeout=120):
    """A script in a file, not -c: multiprocessing's spawn must import its __main__."""
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


# -- 1. ownership by process -------------------------------------------------------------

MP_FORK = """
import gc, multiprocessing as mp, os, sys
from diskpages import PageCache
{count}
cache = PageCache({root!r})
pages = [cache.write(bytes([i]) * 4096) for i in range(50)]

def child_borrows(q):
    # inherited pages and cache are the parent's: drop them all, collect, flush, close
    global pages
    for p in pages[:10]:
        p.release()
    pages = None
    gc.collect()
    cache.remove_released(); cache.collect(); cache.close()
    # and a cache of its own, left open with pages in cycles: removed at the child's exit
    own = PageCache({root!r})
    for i in range(200):
        a = [own.write(b"c" * 100)]
        a.append(a)
    q.put(str(own.path))

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=child_borrows, args=(q,))
    proc.start()
    own_path = q.get(timeout=30)
    proc.join(30)
    assert proc.exitcode == 0, proc.exitcode
    assert not os.path.exists(own_path), "the child's own cache outlived the child"
    assert page_count_on_disk(cache.path) == 50, os.listdir(cache.path)
    assert all(p.read() == bytes([i]) * 4096 for i, p in enumerate(pages))
    with ctx.Pool(2) as pool:  # pool workers fork too, and exit through os._exit
        assert pool.map(len, [b"x"] * 4) == [1] * 4
    assert page_count_on_disk(cache.path) == 50
    print("ok")
"""


def test_multiprocessing_fork_children_borrow_and_clean_only_their_own(root, tmp_path):
    proc = run_script(tmp_path, MP_FORK.format(root=str(root), count=COUNT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n" and proc.stderr == ""
    assert files_in(root) == []


FORK_OWN_CACHE = """
import os, pickle, sys, warnings
from diskpages import PageCache, PageLostError
warnings.filterwarnings("ignore", "This process", DeprecationWarning)  # 3.12+: fork beside the reaper
cache = PageCache({root!r})
page = cache.write(b"parent")
pid = os.fork()
if pid == 0:
    # the reaper thread did not come along: a child cache of its own works normally
    with PageCache({root!r}, max_delay=0.01) as own:
        p = own.write(b"child")
        borrowed = pickle.loads(pickle.dumps(p))  # reads the page's file or slot until it goes
        assert p.read() == b"child"
        del p
        deadline = __import__("time").monotonic() + 10
        gone = False
        while not gone and __import__("time").monotonic() < deadline:
            try:
                borrowed.read()
            except PageLostError:
                gone = True
        assert gone, "the child's own reaper did not remove its page"
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert page.read() == b"parent"
print("ok")
"""


def test_forked_child_opens_its_own_cache_on_the_same_root(root):
    proc = run_python(FORK_OWN_CACHE.format(root=str(root)), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert files_in(root) == []


FORK_WHILE_BUSY = """
import os, threading, warnings
from diskpages import PageCache
warnings.filterwarnings("ignore", "This process", DeprecationWarning)  # 3.12+: fork beside the reaper
cache = PageCache({root!r}, max_delay=0.001, batch=1)
stop = False
def churn():  # the reaper and this thread hold locks at random moments of the fork
    while not stop:
        cache.write(b"x" * 64).release()
        cache.remove_released()
t = threading.Thread(target=churn); t.start()
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        cache.remove_released(); cache.collect(); cache.close()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
stop = True; t.join()
print("ok")
"""


def test_forks_in_the_middle_of_removals_never_hang(root):
    proc = run_python(FORK_WHILE_BUSY.format(root=str(root)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


# -- 2. sharing by pickle ----------------------------------------------------------------


def mapped_paths():
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def test_pickled_page_borrows_in_this_process(cache, packing):
    page = cache.write(b"shared bytes")
    other = pickle.loads(pickle.dumps(page))
    assert isinstance(other, BorrowedPage) and other.borrowed and not page.borrowed
    assert (other.id, other.nbytes) == (page.id, page.nbytes)
    assert other.packed == page.packed == (packing == "packed")
    if packing == "files":
        assert other.path == page.path
    else:
        with pytest.raises(ValueError, match="packed"):
            other.path  # noqa: B018
    assert other.read() == b"shared bytes"
    view = other.view()
    assert bytes(view) == b"shared bytes" and view.readonly
    if packing == "files":
        assert str(page.path) in mapped_paths()  # zero-copy: a mapping of the page's own file
    else:  # a checked copy: the owner may reuse the slot
        assert isinstance(view.obj, bytes)
    where = on_disk(page)
    other.release()
    assert other.released and not page.released
    with pytest.raises(PageReleasedError):
        other.read()
    del other
    cache.remove_released()
    assert where.exists() and page.read() == b"shared bytes"
    again = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(page))))
    assert again.read() == b"shared bytes"
    with pytest.raises(TypeError):
        BorrowedPage()


def test_borrower_after_the_owner_released_gets_page_lost_never_a_crash(cache):
    page = cache.write(b"abc" * 1000)
    other = pickle.loads(pickle.dumps(page))
    early = other.view()
    page.release()
    cache.remove_released()
    with pytest.raises(PageLostError, match="owner"):
        other.read()
    with pytest.raises(PageLostError):
        other.view()
    assert bytes(early[:3]) == b"abc"  # a view taken before stays readable


def test_borrower_never_reads_another_file_under_the_same_name(cache, packing):
    page = cache.write(b"first")
    other = pickle.loads(pickle.dumps(page))
    if packing == "packed":
        # the segment replaced by a copy of itself: the same bytes and tags, another file
        # (the cache's fd keeps the old inode, so the copy cannot take its number)
        segment = other._path
        copy = segment.read_bytes()
        os.unlink(segment)
        segment.write_bytes(copy)
        with pytest.raises(PageLostError, match="not the page"):
            other.read()
        return
    os.unlink(page.path)
    time.sleep(0.05)  # past the file system's clock tick: the check is inode + modification time
    page.path.write_bytes(b"other")  # same name, same size, another file (often same inode)
    st = page.path.stat()
    if (st.st_ino, st.st_mtime_ns) == other._identity[1:]:
        pytest.skip("this file system's clock cannot tell the two files apart")
    with pytest.raises(PageLostError, match="not the page"):
        other.read()


def test_pickling_a_released_page_or_a_closed_caches_page_fails_clearly(root):
    cache = PageCache(root)
    page = cache.write(b"x")
    page.release()
    with pytest.raises(PageReleasedError):
        pickle.dumps(page)
    live = cache.write(b"y")
    cache.close()
    with pytest.raises(PageReleasedError):
        pickle.dumps(live)


BORROWER = """
import multiprocessing as mp, os, pickle, sys

def borrow(blob):
    page = pickle.loads(blob)
    view = page.view()
    if page.packed:  # a slot the owner may reuse: a checked copy, never a mapping
        mapped = not isinstance(view.obj, bytes)
    else:
        with open("/proc/self/maps") as f:
            mapped = str(page.path) in f.read()
    data = bytes(view)
    packed = page.packed
    page.release()
    del page  # its death, too, must leave the file alone
    return data, mapped, packed

def still_there(page):
    # the owner's file (or slot) as it was: a new borrower reads it, and checks it
    return pickle.loads(pickle.dumps(page)).read() == page.read()

if __name__ == "__main__":
    from diskpages import PageCache
    cache = PageCache({root!r})
    page = cache.write(b"%d" % os.getpid() * 1000)
    for method in ("spawn", "fork"):
        with mp.get_context(method).Pool(1) as pool:
            data, mapped, packed = pool.apply(borrow, (pickle.dumps(page),))
        assert data == page.read(), method
        assert packed == page.packed, method
        if packed:  # a slot the owner may reuse: a checked copy, never a mapping
            assert not mapped, method + ": the borrower mapped a slot"
        else:
            assert mapped, method + ": the borrower copied instead of mapping"
        assert still_there(page), method + ": a borrower removed the owner's file"
    # a borrower whose process exits normally (atexit runs) leaves it too
    code = "import pickle, sys; p = pickle.loads(sys.stdin.buffer.read()); p.read(); sys.exit(0)"
    import subprocess
    subprocess.run([sys.executable, "-c", code], input=pickle.dumps(page), check=True)
    assert still_there(page) and page.read() == b"%d" % os.getpid() * 1000
    print("ok")
"""


def test_pickled_page_is_read_zero_copy_in_spawned_and_forked_processes(root, tmp_path):
    proc = run_script(tmp_path, BORROWER.format(root=str(root)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert files_in(root) == []


# -- 3. crash sweep ----------------------------------------------------------------------

KILLED = """
import os, signal, sys
from diskpages import PageCache
caches = [PageCache({root!r}) for _ in range({caches})]
pages = [c.write(b"k" * 4096) for c in caches for _ in range({n})]
print(*(c.path for c in caches), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_caches(root, caches=1, n=10) -> list[str]:
    """The folders of a process killed with caches open (each cache sweeps its root as it
    opens, so one process makes them all)."""
    proc = run_python(KILLED.format(root=str(root), caches=caches, n=n))
    assert proc.returncode == -signal.SIGKILL
    return proc.stdout.split()


def killed_cache(root, n=10) -> str:
    return killed_caches(root, 1, n)[0]


class Holder:
    """A live cache in another process, holding its folder until stop()."""

    def __init__(self, root):
        code = (
            "import sys; from diskpages import PageCache; c = PageCache(sys.argv[1]); "
            "p = c.write(b'live'); print(c.path, flush=True); sys.stdin.read()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.path = self.proc.stdout.readline().strip()

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def test_sweep_removes_killed_processes_folders_and_never_a_live_one(root):
    holder = Holder(root)  # a live cache in another process
    try:
        with PageCache(root) as mine:  # and one in this process
            page = mine.write(b"mine")
            dead = killed_caches(root, caches=3)
            assert all(page_count_on_disk(d) == 10 for d in dead)
            removed = diskpages.sweep(root)
            assert sorted(map(str, removed)) == sorted(dead)
            assert not any(os.path.exists(d) for d in dead)
            assert os.path.exists(holder.path) and page.read() == b"mine"
            assert diskpages.sweep(root) == []  # nothing left to do
    finally:
        holder.stop()
    assert files_in(root) == []


@packing_irrelevant
def test_live_cache_is_safe_whatever_its_pid(root):
    # A live folder renamed to a dead process's pid (pid reuse, in effect): the lock decides.
    holder = Holder(root)
    try:
        fake = os.path.join(root, f"999999-{os.path.basename(holder.path).split('-', 1)[1]}")
        os.rename(holder.path, fake)
        assert diskpages.sweep(root) == []
        assert os.path.exists(fake)
        os.rename(fake, holder.path)
    finally:
        holder.stop()


def test_new_cache_sweeps_its_root(root):
    dead = killed_cache(root)
    with PageCache(root) as cache:
        assert not os.path.exists(dead)
        assert files_in(root) == [cache.path.name]


@packing_irrelevant
def test_sweep_of_a_missing_root_is_empty(tmp_path):
    assert diskpages.sweep(tmp_path / "nothing here") == []


RACE = """
import os, sys, time
from diskpages import PageCache, sweep
from diskpages._folders import list_folders
root, role, until = sys.argv[1], sys.argv[2], float(sys.argv[3])
made = 0
while time.monotonic() < until:  # one clock for every process on the host
    if role == "sweep":
        sweep(root)
    elif role == "ls":  # probes every folder's lock, as a sweep does
        list_folders(root)
    else:
        c = PageCache(root)
        if not c.path.is_dir():
            sys.exit("a sweep removed a cache being created")
        p = c.write(b"r")  # fails if the folder went between creation and now
        assert p.read() == b"r"
        c.close()
        made += 1
print(made)
"""


@packing_irrelevant
def test_sweep_and_ls_racing_cache_creation_never_break_a_new_cache(root):
    root.mkdir(mode=0o700)
    until = str(time.monotonic() + 4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(root), role, until],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("sweep", "ls", "make", "make")
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert int(outs[2][0]) + int(outs[3][0]) > 20  # the race really ran
    assert files_in(root) == []


@packing_irrelevant
def test_sweep_leaves_what_is_not_a_cache_folder(root, tmp_path):
    root.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.mkdir()
    (target / "1.page").write_bytes(b"keep")
    os.symlink(target, root / "12345-00000000-deadbeef")  # shaped like a folder, a symlink
    (root / "notes").mkdir()  # not shaped like a cache folder
    other = root / "12346-00000000-cafecafe"
    other.mkdir()
    (other / "1.page").write_bytes(b"theirs")
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)  # someone else's: never touched
        assert diskpages.sweep(root) == []
        assert (other / "1.page").exists()
    assert (target / "1.page").read_bytes() == b"keep"
    assert (root / "notes").is_dir() and (root / "12345-00000000-deadbeef").is_symlink()


def test_sweep_that_cannot_empty_a_folder_leaves_it_and_says_so(root):
    dead = killed_cache(root, n=3)
    os.mkdir(os.path.join(dead, "intruder"))
    from diskpages._folders import sweep_folders

    result = sweep_folders(root)
    assert result.removed == [] and len(result.failed) == 1
    assert str(result.failed[0][0].path) == dead and os.path.isdir(dead)
    os.rmdir(os.path.join(dead, "intruder"))
    assert [str(p) for p in diskpages.sweep(root)] == [dead]


# -- 4. a page is never seen half written -------------------------------------------------

WRITER = """
import os, sys
from diskpages import PageCache
def size(i): return (i * 7919 % 97 + 1) * 8192  # up to 776 KiB, known from the id alone
cache = PageCache(sys.argv[1])
print(cache.path, flush=True)
keep, i = [], 0
while True:
    i += 1
    data = bytes([i % 251]) * size(i)
    kind = i % 3
    if kind == 0:
        keep.append(cache.write(data))
    elif kind == 1:
        keep.extend(cache.write_many([data]))
    else:
        b = cache.allocate(len(data)); v = b.view()
        for off in range(0, len(data), 65536):
            v[off:off + 65536] = data[off:off + 65536]
        del v; keep.append(b.seal())
    assert keep[-1].id == i
    if len(keep) > 200:
        del keep[:100]
"""


def check_whole(folder):
    """Every file under a page's name, and every slot whose tag names a page, has the
    page's full size and bytes; returns how many pages it checked. (Where the file system
    has no O_TMPFILE, a page being written is "<id>.part": not a page's name. A slot's tag
    is set once its bytes are in.)"""
    pages = 0
    for name in files_in(Path(folder)):
        if name.endswith(".slots"):
            pages += check_whole_slots(Path(folder) / name)
        elif not name.endswith(".part"):
            i = int(name.split(".")[0])
            data = open(os.path.join(folder, name), "rb").read()
            assert len(data) == (i * 7919 % 97 + 1) * 8192, f"{name} is {len(data)} bytes: half written"
            assert data == bytes([i % 251]) * len(data), f"{name} has the wrong bytes"
            pages += 1
    return pages


def check_whole_slots(segment: Path) -> int:
    """check_whole for a segment of packed pages (csrc/diskpages.h: tags, then slots)."""
    from diskpages import _bindings as native

    slot_size = int(segment.name.removesuffix(".slots"))
    pages = 0
    with open(segment, "rb") as f:
        slots = max(0, os.fstat(f.fileno()).st_size - native.TAGS_BYTES) // slot_size
        tags = f.read(slots * native.TAG_BYTES)
        for slot, (i, nbytes, _, _) in enumerate(struct.iter_unpack("<QQQQ", tags)):
            if not i:
                continue
            where = f"slot {slot} of {segment}: page {i}"
            assert nbytes == (i * 7919 % 97 + 1) * 8192, f"{where} is {nbytes} bytes"
            f.seek(native.TAGS_BYTES + slot * slot_size)
            data = f.read(nbytes)
            assert data == bytes([i % 251]) * nbytes, f"{where} is half written"
            pages += 1
    return pages


@pytest.mark.parametrize(
    "delay, tmpfile",
    [(0.15, "1"), (0.4, "1"), (0.9, "1"), (0.3, "0")],
    ids=["0.15s", "0.4s", "0.9s", "no-tmpfile"],
)
def test_sigkill_while_writing_leaves_no_half_written_page(root, delay, tmpfile):
    survivor = PageCache(root)
    kept = survivor.write(b"survivor")
    kept_on_disk = on_disk(kept)
    env = dict(os.environ, DISKPAGES_TMPFILE=tmpfile)  # "0": as on a file system without O_TMPFILE
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:  # the writer never stops by itself: kill it whatever happens here
        folder = proc.stdout.readline().strip()
        assert wait_until(lambda: page_count_on_disk(folder) > 5, timeout=30)
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait()
    assert check_whole(folder) > 0
    assert page_count_on_disk(survivor) == 1 and kept_on_disk.exists()
    assert [str(p) for p in diskpages.sweep(root)] == [folder]
    assert kept.read() == b"survivor"
    survivor.close()
    assert files_in(root) == []


# -- 6. no one else's files, no one else in ------------------------------------------------


def test_root_cache_folder_and_pages_are_private(root):
    with PageCache(root) as cache:
        cache.write(b"x")  # a page's file, or a slot of a segment file
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o700
        built = cache.allocate(4).seal()
        assert stat.S_IMODE(os.stat(built.path).st_mode) == 0o600
        names = os.listdir(cache.path)
        assert len(names) == 2, names
        for name in names:
            assert stat.S_IMODE(os.stat(cache.path / name).st_mode) == 0o600, name


@packing_irrelevant
def test_root_that_is_a_symlink_is_refused(root, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, root)
    with pytest.raises(UnsafeRootError, match="symbolic link"):
        PageCache(root)
    with pytest.raises(UnsafeRootError):
        diskpages.sweep(root)
    assert os.listdir(real) == []


@packing_irrelevant
@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o720, 0o702])
def test_root_writable_by_others_is_refused(root, mode):
    root.mkdir()
    os.chmod(root, mode)
    with pytest.raises(UnsafeRootError, match="written by others") as info:
        PageCache(root)
    assert os.listdir(root) == []
    # The advice is a private folder under it (made 0700) or the default root, never to
    # chmod a folder that others may need to write to (/tmp)
    message = str(info.value)
    assert "chmod" not in message
    assert f"{root / 'myapp'}" in message and str(diskpages.default_root()) in message
    with PageCache(root / "myapp") as cache:  # the advice works
        assert cache.write(b"x").read() == b"x"


@packing_irrelevant
def test_tmp_itself_as_root_is_refused_with_advice_that_keeps_tmp_as_it_is():
    with pytest.raises(UnsafeRootError) as info:
        PageCache("/tmp")
    assert "chmod" not in str(info.value)


@packing_irrelevant
def test_root_of_another_user_is_refused(root):
    if os.geteuid() != 0:
        pytest.skip("making a folder owned by another user needs root")
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(UnsafeRootError, match="belongs to uid 65534"):
        PageCache(root)
    assert os.listdir(root) == []


# -- 7. shutdown noise ---------------------------------------------------------------------

SHUTDOWN = """
import gc, multiprocessing as mp, os, sys, warnings
from diskpages import PageCache
warnings.filterwarnings("ignore", "This process", DeprecationWarning)  # 3.12+: fork beside the reaper

def cycles(cache, n):
    for i in range(n):
        a = [cache.write(b"%d" % i)]
        a.append(a)

def child(root):
    c = PageCache(root)
    cycles(c, 1000)
    globals()["keep"] = c  # alive at exit, with thousands of pages in cycles

if __name__ == "__main__":
    gc.disable()  # nothing is collected before exit
    root = sys.argv[1]
    main = PageCache(root)
    cycles(main, 2000)
    for method in ("fork", "spawn"):
        p = mp.get_context(method).Process(target=child, args=(root,))
        p.start(); p.join(60)
        assert p.exitcode == 0
    pid = os.fork()
    if pid == 0:
        child(root)
        sys.exit(0)  # atexit: the child's own cache goes, the parent's stays
    os.waitpid(pid, 0)
    assert os.listdir(root) == [main.path.name], os.listdir(root)
    assert page_count_on_disk(main.path) == 2000
"""


def test_exit_with_thousands_of_cyclic_pages_is_silent_and_leaves_nothing(root, tmp_path):
    proc = run_script(tmp_path, COUNT + SHUTDOWN, root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert files_in(root) == []


@files_only
def test_without_o_tmpfile_pages_are_written_as_part_files_and_renamed(root, monkeypatch):
    monkeypatch.setenv("DISKPAGES_TMPFILE", "0")
    with PageCache(root, sync="full", pack_max=0) as cache:
        builder = cache.allocate(4)
        assert files_in(cache.path) == [f"{builder.id}.part"]
        builder.view()[:] = b"abcd"
        page = builder.seal()
        written = cache.write_many([b"1", b"22"])
        assert files_in(cache.path) == sorted(p.path.name for p in [page, *written])
        assert page.read() == b"abcd" and [p.read() for p in written] == [b"1", b"22"]
        dropped = cache.allocate(8)
        del dropped  # unsealed: its .part file goes like a page
        del page, written
        cache.remove_released()
        assert files_in(cache.path) == []


@files_only
def test_without_proc_nameless_pages_are_named_through_at_empty_path(root):
    # With no /proc, /proc/self/fd/N cannot be linked; the page is named by
    # linkat(fd, "", AT_EMPTY_PATH) instead. Hide /proc in a mount namespace of its own.
    code = """
        import os, sys
        from diskpages import PageCache
        assert not os.path.exists("/proc/self/fd")
        with PageCache(sys.argv[1], sync="full", pack_max=0) as cache:
            builder = cache.allocate(4)
            assert os.listdir(cache.path) == []  # nameless while unsealed, not a .part file
            builder.view()[:] = b"abcd"
            page = builder.seal()
            written = cache.write_many([b"1", b"22"]) + [cache.write(b"333")]
            names = sorted(p.path.name for p in [page, *written])
            assert sorted(os.listdir(cache.path)) == names, os.listdir(cache.path)
            assert [p.read() for p in [page, *written]] == [b"abcd", b"1", b"22", b"333"]
            del page, written
            cache.remove_released()
            assert os.listdir(cache.path) == []
            print("named", len(names))
    """
    script = [sys.executable, "-c", textwrap.dedent(code), str(root)]
    hide = 'mount -t tmpfs none /proc || exit 77; exec "$@"'
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "sh", "-c", hide, "sh", *script],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1)")
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot hide /proc here: {proc.stderr.strip()}")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "named 4\n", "")
    assert files_in(root) == []


@packing_irrelevant
@pytest.mark.parametrize("probe", ["sweep", "ls"])
def test_a_folder_between_mkdir_and_its_lock_is_left_alone(root, probe):
    """The window a new cache is in, held open: a sweep or ls must wait for it to close
    rather than take the folder's lock (or the folder)."""
    import fcntl
    import threading

    from diskpages._folders import list_folders

    OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    root.mkdir(mode=0o700)
    root_fd = os.open(root, OPEN_DIR)
    fcntl.flock(root_fd, fcntl.LOCK_SH)  # as PageCache() holds it from mkdir to lock
    name = f"{os.getpid()}-00000000-0badcafe"
    os.mkdir(root / name, 0o700)
    result = []
    worker = threading.Thread(
        target=lambda: result.append(diskpages.sweep(root) if probe == "sweep" else list_folders(root))
    )
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and result == [], "it did not wait for the root lock"
    folder_fd = os.open(root / name, OPEN_DIR)
    fcntl.flock(folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody took it meanwhile
    fcntl.flock(root_fd, fcntl.LOCK_UN)
    worker.join(30)
    if probe == "sweep":
        assert result == [[]]
    else:
        assert [(f.path.name, f.alive) for f in result[0]] == [(name, True)]
    assert os.path.isdir(root / name)
    os.close(folder_fd)
    os.close(root_fd)
    os.rmdir(root / name)


# -- 7. a user's folder only named like a cache folder -------------------------------------


def lookalikes_of(dead: str) -> list[Path]:
    """Folders of the user's own, each holding a file, named like the orphaned cache folder
    ``dead`` but not quite: its name and a final newline (a regex's ``$`` matches before
    one), and its name with the pid in Arabic-Indic digits (``\\d`` matches them, int()
    reads them)."""
    folder = Path(dead)
    pid, rest = folder.name.split("-", 1)
    arabic = pid.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    made = []
    for name in (folder.name + "\n", f"{arabic}-{rest}"):
        path = folder.parent / name
        path.mkdir()
        (path / "1.page").write_bytes(b"mine")
        made.append(path)
    return made


@packing_irrelevant
@pytest.mark.parametrize("how", ["sweep", "PageCache", "ls"])
def test_a_folder_only_named_like_a_cache_folder_is_never_swept_or_listed(root, how):
    from diskpages._folders import list_folders

    dead = killed_cache(root, n=2)
    mine = lookalikes_of(dead)
    if how == "sweep":
        assert [str(p) for p in diskpages.sweep(root)] == [dead]
    elif how == "PageCache":  # sweeps the root as it opens
        PageCache(root).close()
        assert not os.path.exists(dead)
    else:
        assert [str(f.path) for f in list_folders(root)] == [dead]
    for path in mine:
        assert (path / "1.page").read_bytes() == b"mine", path
