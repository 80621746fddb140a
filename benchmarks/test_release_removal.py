"""What dropping a page costs the caller, and how fast released pages' files go, in fresh
and steady state (diskstate.py).

release: the time to drop the last reference to N pages (the Page objects' deallocation
and finalizers), per page, against objects with an empty __del__ (the interpreter's own
cost), a plain slotted object without one, an explicit ``page.release()`` call, and the
naive design the seed notebook starts from (__del__ unlinks its own file synchronously).

removal: remove_released() of N released 4 KiB pages through io_uring, the same through the plain
loop remover (DISKPAGES_REMOVER=loop), a C unlinkat loop (the floor), a Python os.unlink
loop, and shutil.rmtree of the folder; diskpages with pack_max=0 (a file per page, like the
others), and with its default (the pages packed in a segment file: no unlink at all). Files
are made in setup (untimed); in steady state each create costs ~1 ms, hence fewer files a
round there. Removal runs on this disk, a journaled ext4 and a tmpfs (``fs``:
filesystems.py).
"""

from __future__ import annotations

import os
import shutil

import pytest

from diskpages import PageCache

from conftest import ROUNDS, scaled
from harness import record


class Slotted:
    __slots__ = ("a",)


class EmptyDel:
    __slots__ = ("a",)

    def __del__(self):
        pass


class NaivePage:
    """The seed's Table: a file per object, unlinked in __del__."""

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path

    def __del__(self):
        os.unlink(self.path)


class DropObjects:
    """Make objects in setup (untimed); drop them all in run (timed)."""

    def __init__(self, make, per_round, drop=None):
        self.make, self.per_round, self.drop_each = make, per_round, drop
        self.objs: list = []

    def drop(self):
        pass  # run() removes everything a round makes

    def setup(self):
        self.objs = self.make()

    def run(self):
        if self.drop_each is not None:
            for obj in self.objs:
                self.drop_each(obj)
        self.objs.clear()

    def cleanup(self):
        self.objs = []


def test_release_cost(benchmark, disk, state):
    n = scaled(5000, 2000, 20) if state == "fresh" else scaled(300, 150, 20)
    caches: list[PageCache] = []
    small = b"r" * 16
    n_naive = max(n // 20, 10)  # the naive design does ~100x more work per object

    # Each round's files go into a new folder (own_group: see diskstate.Disk); the previous
    # round's files are removed first, untimed.
    def naive():
        folder = disk.folder("naive", own_group=True)
        paths = [str(folder / f"{i}") for i in range(n_naive)]
        for p in paths:
            with open(p, "wb") as f:
                f.write(small)
        return [NaivePage(p) for p in paths]

    def pages():
        while caches:
            caches.pop().close()
        caches.append(PageCache(disk.folder("pages", own_group=True), max_delay=3600, batch=2**31 - 1))
        return caches[-1].write_many([small] * n)

    runners = {
        "slotted object, no __del__": DropObjects(lambda: [Slotted() for _ in range(n)], n),
        "empty __del__": DropObjects(lambda: [EmptyDel() for _ in range(n)], n),
        "diskpages Page": DropObjects(pages, n),
        "diskpages page.release()": DropObjects(pages, n, drop=lambda page: page.release()),
        "naive __del__ + os.unlink": DropObjects(naive, n_naive),
    }
    try:
        record(
            benchmark,
            f"release: drop the last reference, {state}",
            runners,
            n,
            "empty __del__",
            ROUNDS,
            before_round=disk.before_round,
            kind="release",
            unit="page",
            state=state,
        )
    finally:
        while caches:
            caches.pop().close()


class FlushPages:
    """A new cache in a new folder every round (own_group: see diskstate.Disk)."""

    def __init__(self, disk, remover, synced, n, pack_max=0):
        self.disk, self.remover, self.synced, self.per_round = disk, remover, synced, n
        self.pack_max = pack_max  # 0: a file per page, removed by unlink like the others'
        self.cache = None

    def drop(self):
        pass

    def setup(self):
        old = os.environ.get("DISKPAGES_REMOVER")
        os.environ["DISKPAGES_REMOVER"] = self.remover
        try:
            folder = self.disk.folder(f"flush-{self.remover}", own_group=True)
            sync = "data" if self.synced else "none"  # "data": each page fdatasync'ed
            self.cache = PageCache(folder, sync=sync, max_delay=3600, batch=2**31 - 1, pack_max=self.pack_max)
        finally:
            if old is None:
                del os.environ["DISKPAGES_REMOVER"]
            else:
                os.environ["DISKPAGES_REMOVER"] = old
        pages = self.cache.write_many([b"d" * 4096] * self.per_round)
        del pages  # all released, none removed yet

    def run(self):
        assert self.cache.remove_released() == self.per_round

    def finish(self, measured):
        self.cleanup()

    def cleanup(self):
        if self.cache is not None:
            self.cache.close()
            self.cache = None


class UnlinkFiles:
    def __init__(self, disk, floor, kind, synced, n):
        self.disk, self.floor, self.kind, self.synced, self.per_round = disk, floor, kind, synced, n
        self.dir = None
        self.dirfd = -1
        self.buf = floor.ffi.from_buffer(b"d" * 4096)

    def drop(self):
        pass

    def setup(self):
        self.dir = self.disk.folder(self.kind, own_group=True)
        self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        sync = 1 if self.synced else 0  # 1: each file fdatasync'ed
        assert self.floor.lib.floor_write(self.dirfd, 0, self.per_round, self.buf, 4096, sync) == 0

    def run(self):
        if self.kind == "floor":
            assert self.floor.lib.floor_unlink(self.dirfd, 0, self.per_round) == 0
        elif self.kind == "python":
            fd = self.dirfd
            for i in range(self.per_round):
                os.unlink(f"{i}.page", dir_fd=fd)
        else:
            shutil.rmtree(self.dir)
        if self.kind != "rmtree":
            os.rmdir(self.dir)
        os.close(self.dirfd)

    def cleanup(self):
        pass


@pytest.mark.parametrize("data", ["written back", "in page cache"])
def test_removal_rate(benchmark, floor, disk, state, data, fs):
    """ "written back": each file fdatasync'ed when made (untimed; this process's files only,
    not a global os.sync that waits for everyone's), so the files own blocks on the device
    and each unlink waits for their discard; "in page cache": delayed allocation has given
    the files no blocks yet, and unlink is cheap."""
    synced = data == "written back"
    # a written-back file waits ~0.1-1 ms for its discard: fewer of those; in steady state
    # each create (untimed, in setup) costs ~1 ms
    if state == "fresh":
        n = scaled(200, 100, 20) if synced else scaled(2000, 1000, 20)
    else:
        n = scaled(100, 40, 20) if synced else scaled(150, 100, 20)
    runners = {
        "unlinkat loop in C (floor)": UnlinkFiles(disk, floor, "floor", synced, n),
        "os.unlink loop": UnlinkFiles(disk, floor, "python", synced, n),
        "shutil.rmtree": UnlinkFiles(disk, floor, "rmtree", synced, n),
        "flush, io_uring": FlushPages(disk, "auto", synced, n),
        "flush, loop remover": FlushPages(disk, "loop", synced, n),
        # the default: 4 KiB pages are slots in a segment file, freed by punching holes
        "flush, packed (default)": FlushPages(disk, "auto", synced, n, pack_max=None),
    }
    record(
        benchmark,
        f"removal of 4 KiB pages, {data}, {state} on {fs.label}",
        runners,
        n,
        "unlinkat loop in C (floor)",
        ROUNDS,
        warmup=disk.warmup,
        before_round=disk.before_round,
        kind="removal",
        fs=fs.name,
        fs_info=fs.info,
        unit="file",
        data=data,
        state=state,
    )
