"""NumPy arrays as pages: writing and reading a 64 MiB float64 array, against numpy's own
.npy paths, in interleaved rounds (see harness.py).

write (baseline np.save to a file): cache.write_array (header and data in one pwritev,
from the array's own memory); cache.allocate_array filled through builder.array() and
sealed (one copy into a shared mapping); np.lib.format.open_memmap filled the same way.
Each contender writes into its own folder; the previous round's file is removed before
each round, untimed. Under sync="data" the numpy contenders fdatasync / msync too.

strided write (baseline np.save, which copies 16 MiB chunks): a 64 MiB float64 array
that is every other element of a 128 MiB one. cache.write_array writes it in C order in
pieces of at most 16 MiB (copy, pwrite); "copy + write_array" is how it was written
before, a whole contiguous copy in memory first and then one pwritev.

read (baseline np.load(mmap_mode="r") + a full sum): page.array() + the same sum, both of
the same page file (in the page cache: the cost measured is mapping, faulting and summing);
and np.load into memory + sum for reference.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from diskpages import PageCache

from conftest import QUICK, ROUNDS, fresh_dir, scaled
from harness import record

# quick: 8 MiB once a round (16 MiB twice wrote 1 GB in the sync="data" group alone)
NBYTES = scaled(64 << 20, 8 << 20, 1 << 20)
WRITES_PER_ROUND = 1 if QUICK else 2
READS_PER_ROUND = 2 if QUICK else 4


def make_array(times: int = 1) -> np.ndarray:
    return np.random.default_rng(0).random(times * NBYTES // 8)


class NumpyWrite:
    """np.save into a file, or open_memmap filled in place."""

    def __init__(self, root, kind, array, sync):
        self.dir = fresh_dir(root)
        self.kind, self.array, self.sync = kind, array, sync
        self.next = 0

    def setup(self):
        for name in os.listdir(self.dir):
            os.unlink(self.dir / name)

    def run(self):
        for _ in range(WRITES_PER_ROUND):
            path = self.dir / f"{self.next}.npy"
            self.next += 1
            if self.kind == "np.save":
                with open(path, "xb") as f:
                    np.save(f, self.array)
                    if self.sync != "none":
                        f.flush()
                        os.fdatasync(f.fileno())
            else:
                out = np.lib.format.open_memmap(path, "w+", self.array.dtype, self.array.shape)
                out[...] = self.array
                if self.sync != "none":
                    out.flush()
                del out

    def cleanup(self):
        shutil.rmtree(self.dir)


class DiskpagesWrite:
    """cache.write_array, or allocate_array filled in place and sealed."""

    def __init__(self, root, kind, array, sync):
        self.cache = PageCache(root, sync=sync, max_delay=3600, batch=2**31 - 1)
        self.kind, self.array = kind, array
        self.pages: list = []

    def setup(self):
        self.pages = []  # the previous round's pages die here...
        self.cache.remove_released()  # ...and their files go before this round

    def run(self):
        array = self.array
        for _ in range(WRITES_PER_ROUND):
            if self.kind == "write_array":
                self.pages.append(self.cache.write_array(array))
            elif self.kind == "copy + write_array":
                self.pages.append(self.cache.write_array(np.ascontiguousarray(array)))
            else:
                builder = self.cache.allocate_array(array.shape, array.dtype)
                out = builder.array()
                out[...] = array
                del out
                self.pages.append(builder.seal())

    def cleanup(self):
        self.pages = []
        self.cache.close()


WRITERS = {
    "np.save": NumpyWrite,
    "write_array": DiskpagesWrite,
    "allocate_array": DiskpagesWrite,
    "open_memmap": NumpyWrite,
}


STRIDED_WRITERS = {"np.save": NumpyWrite, "write_array": DiskpagesWrite, "copy + write_array": DiskpagesWrite}


WRITE_CASES = [("contiguous", "none"), ("contiguous", "data"), ("strided", "none")]


@pytest.mark.parametrize("layout, sync", WRITE_CASES)
def test_write_array(benchmark, bench_root, layout, sync):
    if layout == "strided":  # every other float of twice as many
        array, writers, name = make_array(2)[::2], STRIDED_WRITERS, "strided "
    else:
        array, writers, name = make_array(), WRITERS, ""
    runners = {kind: cls(bench_root, kind, array, sync) for kind, cls in writers.items()}
    record(
        benchmark,
        f"array write {NBYTES >> 20}MiB float64 {name}sync={sync}",
        runners,
        WRITES_PER_ROUND,
        "np.save",
        ROUNDS,
        unit="array",
        size=NBYTES,
        sync=sync,
    )


class Read:
    def __init__(self, page, kind, expected):
        self.page, self.kind, self.expected = page, kind, expected

    def setup(self):
        pass

    def run(self):
        for _ in range(READS_PER_ROUND):
            if self.kind == "page.array":
                total = self.page.array().sum()
            elif self.kind == "np.load mmap":
                total = np.load(self.page.path, mmap_mode="r").sum()
            else:
                total = np.load(self.page.path).sum()
            assert abs(total - self.expected) <= 1e-9 * abs(self.expected)

    def cleanup(self):
        pass


def test_read_array(benchmark, bench_root):
    array = make_array()
    with PageCache(bench_root, max_delay=3600) as cache:
        page = cache.write_array(array)
        expected = array.sum()
        del array
        runners = {kind: Read(page, kind, expected) for kind in ("np.load mmap", "page.array", "np.load")}
        record(
            benchmark,
            "array read 64MiB float64 + sum",
            runners,
            READS_PER_ROUND,
            "np.load mmap",
            ROUNDS,
            unit="array",
            size=NBYTES,
        )
