"""What dropping a page costs the caller, and how fast released pages' files go.

release: the time to drop the last reference to N pages (the Page objects' deallocation
and finalizers), per page, against objects with an empty __del__ (the interpreter's own
cost), against a plain slotted object without one, and against the naive design the seed
notebook starts from (__del__ unlinks its own file synchronously).

removal: flush() of N released 4 KiB pages through io_uring, the same through the plain
loop remover (DISKPAGES_REMOVER=loop), a C unlinkat loop (the floor), a Python os.unlink
loop, and shutil.rmtree of the folder.
"""

from __future__ import annotations

import os
import shutil

import pytest

from diskpages import PageCache

from conftest import QUICK, ROUNDS, fresh_dir
from harness import record

N_RELEASE = 5_000 if QUICK else 20_000
N_REMOVE = 1_000 if QUICK else 2_000


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

    def __init__(self, make, per_round):
        self.make, self.per_round = make, per_round
        self.objs: list = []

    def setup(self):
        self.objs = self.make()

    def run(self):
        self.objs.clear()

    def cleanup(self):
        self.objs = []


def test_release_cost(benchmark, bench_root):
    cache = PageCache(bench_root, max_delay=3600, batch=2**31 - 1)
    naive_dir = fresh_dir(bench_root)
    small = b"r" * 16
    n_naive = N_RELEASE // 20  # the naive design does ~100x more work per object

    def naive():
        paths = [str(naive_dir / f"{i}") for i in range(n_naive)]
        for p in paths:
            with open(p, "wb") as f:
                f.write(small)
        return [NaivePage(p) for p in paths]

    def pages():
        cache.flush()  # remove the previous round's files, untimed
        return cache.write_many([small] * N_RELEASE)

    runners = {
        "slotted object, no __del__": DropObjects(lambda: [Slotted() for _ in range(N_RELEASE)], N_RELEASE),
        "empty __del__": DropObjects(lambda: [EmptyDel() for _ in range(N_RELEASE)], N_RELEASE),
        "diskpages Page": DropObjects(pages, N_RELEASE),
        "naive __del__ + os.unlink": DropObjects(naive, n_naive),
    }
    try:
        record(
            benchmark,
            "release: drop the last reference",
            runners,
            N_RELEASE,
            "empty __del__",
            ROUNDS,
            unit="page",
        )
    finally:
        cache.close()
        shutil.rmtree(naive_dir, ignore_errors=True)


class FlushPages:
    def __init__(self, root, remover, synced):
        self.root, self.remover, self.synced = root, remover, synced
        self.cache = None

    def setup(self):
        old = os.environ.get("DISKPAGES_REMOVER")
        os.environ["DISKPAGES_REMOVER"] = self.remover
        try:
            if self.cache is None:
                self.cache = PageCache(self.root, max_delay=3600, batch=2**31 - 1)
        finally:
            if old is None:
                del os.environ["DISKPAGES_REMOVER"]
            else:
                os.environ["DISKPAGES_REMOVER"] = old
        pages = self.cache.write_many([b"d" * 4096] * N_REMOVE)
        del pages  # all released, none removed yet
        if self.synced:
            os.sync()

    def run(self):
        assert self.cache.flush() == N_REMOVE

    def cleanup(self):
        self.cache.close()


class UnlinkFiles:
    def __init__(self, root, floor, kind, synced):
        self.root, self.floor, self.kind, self.synced = root, floor, kind, synced
        self.dir = None
        self.dirfd = -1
        self.buf = floor.ffi.from_buffer(b"d" * 4096)

    def setup(self):
        self.dir = fresh_dir(self.root)
        self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        assert self.floor.lib.floor_write(self.dirfd, 0, N_REMOVE, self.buf, 4096, 0) == 0
        if self.synced:
            os.sync()

    def run(self):
        if self.kind == "floor":
            assert self.floor.lib.floor_unlink(self.dirfd, 0, N_REMOVE) == 0
        elif self.kind == "python":
            fd = self.dirfd
            for i in range(N_REMOVE):
                os.unlink(f"{i}.page", dir_fd=fd)
        else:
            shutil.rmtree(self.dir)
        if self.kind != "rmtree":
            os.rmdir(self.dir)
        os.close(self.dirfd)

    def cleanup(self):
        pass


@pytest.mark.parametrize("state", ["fresh", "steady"])
@pytest.mark.parametrize("data", ["written back", "in page cache"])
def test_removal_rate(benchmark, request, bench_root, floor, data, state):
    """ "written back": os.sync() before each round, so the files own blocks on the device
    and each unlink waits for the discard; "in page cache": delayed allocation has given
    the files no blocks yet, and unlink is cheap."""
    if state == "steady":
        request.getfixturevalue("churned")
    synced = data == "written back"
    runners = {
        "unlinkat loop in C (floor)": UnlinkFiles(bench_root, floor, "floor", synced),
        "os.unlink loop": UnlinkFiles(bench_root, floor, "python", synced),
        "shutil.rmtree": UnlinkFiles(bench_root, floor, "rmtree", synced),
        "flush, io_uring": FlushPages(bench_root, "auto", synced),
        "flush, loop remover": FlushPages(bench_root, "loop", synced),
    }
    record(
        benchmark,
        f"removal of 4 KiB pages, {data}, {state}",
        runners,
        N_REMOVE,
        "unlinkat loop in C (floor)",
        ROUNDS,
        unit="file",
    )
