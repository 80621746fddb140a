"""Writes: diskpages' write paths against the C floor and a plain Python loop, per page
size, sync mode and disk state, in interleaved rounds (see harness.py).

"fresh": every round writes into a new folder; files are deleted only after the group.
"steady": after the session's churn, one long-lived folder per contender, the previous
round's pages dropped and removed just before each round (a create-and-drop loop).
"""

from __future__ import annotations

import os
import shutil

import pytest

from diskpages import PageCache, _bindings

from conftest import QUICK, ROUNDS, fresh_dir
from harness import record

SIZES = {"4KiB": 4096, "64KiB": 64 << 10, "1MiB": 1 << 20}
PER_ROUND = {4096: 400, 64 << 10: 120, 1 << 20: 24}
SYNC_NUM = {"none": 0, "data": 1, "full": 2}


class FileLoop:
    """The floor (the same system calls in a C loop) or a plain Python loop."""

    def __init__(self, root, floor, kind, data, n, sync, steady):
        self.root, self.floor, self.kind = root, floor, kind
        self.data, self.n, self.sync, self.steady = data, n, sync, steady
        self.dirs: list[str] = []
        self.dirfd = -1
        self.next = 0
        self.cbuf = floor.ffi.from_buffer(data)

    def setup(self):
        if self.steady and self.dirfd >= 0:
            if self.next:  # drop the previous round's files: the create-and-drop loop
                assert self.floor.lib.floor_unlink(self.dirfd, self.next - self.n, self.n) == 0
            return
        if self.dirfd >= 0:
            os.close(self.dirfd)
        self.dirs.append(str(fresh_dir(self.root)))
        self.dirfd = os.open(self.dirs[-1], os.O_RDONLY | os.O_DIRECTORY)
        self.next = 0

    def run(self):
        start, self.next = self.next, self.next + self.n
        if self.kind == "floor":
            rc = self.floor.lib.floor_write(
                self.dirfd, start, self.n, self.cbuf, len(self.data), SYNC_NUM[self.sync]
            )
            assert rc == 0, os.strerror(-rc)
            return
        folder, data, sync, dirfd = self.dirs[-1], self.data, self.sync, self.dirfd
        for i in range(start, start + self.n):
            with open(os.path.join(folder, f"{i}.page"), "xb", buffering=0) as f:
                f.write(data)
                if sync != "none":
                    os.fdatasync(f.fileno())
            if sync == "full":
                os.fsync(dirfd)

    def cleanup(self):
        os.close(self.dirfd)
        for d in self.dirs:
            shutil.rmtree(d)


class Diskpages:
    """write() per page, write_many() once per round, write() through mmap, or allocate()."""

    def __init__(self, root, kind, data, n, sync, steady):
        self.root, self.kind, self.data, self.n = root, kind, data, n
        self.sync, self.steady = sync, steady
        self.cache: PageCache | None = None
        self.pages: list = []
        self.old: list[PageCache] = []

    def setup(self):
        self.pages = []  # the previous round's pages die here...
        if self.cache is not None and self.steady:
            self.cache.flush()  # ...and are removed before the next round
            return
        if self.cache is not None:
            self.old.append(self.cache)  # fresh: keep the files until the group ends
        self.cache = PageCache(self.root, sync=self.sync, max_delay=3600, batch=2**31 - 1)
        if self.kind == "write_mmap":
            self.cache._write_method = _bindings.WRITE_METHODS["mmap"]

    def run(self):
        cache, data, n, pages = self.cache, self.data, self.n, self.pages
        if self.kind == "write_many":
            pages.extend(cache.write_many([data] * n))
        elif self.kind == "allocate":
            for _ in range(n):
                b = cache.allocate(len(data))
                b.view()[:] = data
                pages.append(b.seal())
        else:
            write = cache.write
            for _ in range(n):
                pages.append(write(data))

    def cleanup(self):
        self.pages = []
        for c in [*self.old, self.cache]:
            if c is not None:
                c.close()


CONTENDERS = ["floor", "python", "write", "write_many", "write_mmap", "allocate"]


@pytest.mark.parametrize("state", ["fresh", "steady"])
@pytest.mark.parametrize("sync", list(SYNC_NUM))
@pytest.mark.parametrize("size", list(SIZES))
def test_write(benchmark, request, bench_root, floor, size, sync, state):
    if QUICK and size == "64KiB" and sync != "none":
        pytest.skip("quick mode: 64 KiB pages are measured with sync=none only")
    if state == "steady":
        request.getfixturevalue("churned")
    nbytes = SIZES[size]
    n = PER_ROUND[nbytes] // (2 if QUICK else 1)
    data = os.urandom(nbytes)
    steady = state == "steady"
    runners = {}
    for name in CONTENDERS:
        if name in ("floor", "python"):
            runners[name] = FileLoop(bench_root, floor, name, data, n, sync, steady)
        else:
            runners[name] = Diskpages(bench_root, name, data, n, sync, steady)
    record(
        benchmark,
        f"write {size} sync={sync} {state}",
        runners,
        n,
        "floor",
        ROUNDS,
        unit="page",
        size=nbytes,
        sync=sync,
        state=state,
    )
