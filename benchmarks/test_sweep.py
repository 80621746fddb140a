"""The crash sweep: what it costs to remove the folders killed processes left, and what it
costs when there is nothing to remove (every PageCache() pays that when it opens).

orphans: 100 orphaned folders of 100 written-back 4 KiB pages each (the folders of killed
processes: nobody holds their lock). diskpages.sweep() against shutil.rmtree of the same
folders (the baseline) and `diskpages sweep`'s own listing done by hand (os.scandir + an
unlinkat loop in Python).

nothing: a root with 10 live caches and no orphan; sweep() against os.listdir(root).
"""

from __future__ import annotations

import os
import shutil
import uuid

import diskpages
from diskpages import PageCache

from conftest import ROUNDS, scaled
from harness import record

FOLDERS, PAGES = scaled(100, 5, 2), scaled(100, 100, 5)


class Orphans:
    """Make FOLDERS unlocked cache folders of PAGES files (untimed), then remove them."""

    def __init__(self, root, floor, how):
        self.root, self.floor, self.how = root / f"sweep-{how.replace(' ', '-')}", floor, how
        self.root.mkdir(mode=0o700)
        self.buf = floor.ffi.from_buffer(b"o" * 4096)
        self.per_round = FOLDERS * PAGES

    def setup(self):
        for i in range(FOLDERS):
            folder = self.root / f"{900000 + i}-00000000-{uuid.uuid4().hex[:8]}"
            folder.mkdir(mode=0o700)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            assert self.floor.lib.floor_write(fd, 0, PAGES, self.buf, 4096, 0) == 0
            os.close(fd)
        os.sync()  # a killed process's pages were written long ago

    def run(self):
        if self.how == "diskpages.sweep":
            assert len(diskpages.sweep(self.root)) == FOLDERS
        elif self.how == "shutil.rmtree":
            for entry in os.scandir(self.root):
                shutil.rmtree(entry.path)
        else:
            for entry in os.scandir(self.root):
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
                for name in os.listdir(fd):
                    os.unlink(name, dir_fd=fd)
                os.close(fd)
                os.rmdir(entry.path)
        assert os.listdir(self.root) == []

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


def test_sweep_orphans(benchmark, bench_root, floor):
    runners = {
        "shutil.rmtree": Orphans(bench_root, floor, "shutil.rmtree"),
        "os.unlink loop": Orphans(bench_root, floor, "os.unlink loop"),
        "diskpages.sweep": Orphans(bench_root, floor, "diskpages.sweep"),
    }
    record(
        benchmark,
        f"sweep: {FOLDERS} orphaned folders x {PAGES} written-back pages",
        runners,
        FOLDERS * PAGES,
        "shutil.rmtree",
        min(ROUNDS, 5),
        unit="page",
    )


class Repeat:
    def __init__(self, fn, n):
        self.fn, self.per_round = fn, n

    def setup(self):
        pass

    def run(self):
        for _ in range(self.per_round):
            self.fn()

    def cleanup(self):
        pass


def test_sweep_nothing_to_do(benchmark, bench_root):
    root = bench_root / "sweep-live"
    caches = [PageCache(root) for _ in range(10)]
    try:
        runners = {
            "os.listdir(root)": Repeat(lambda: os.listdir(root), 200),
            "diskpages.sweep, 10 live caches": Repeat(lambda: diskpages.sweep(root), 200),
            "PageCache(root).close()": Repeat(lambda: PageCache(root).close(), 50),
        }
        record(benchmark, "sweep: nothing to do", runners, 200, "os.listdir(root)", ROUNDS, unit="call")
    finally:
        for c in caches:
            c.close()
