"""What one small packed page costs, per page, against the least Python can pay for it.

4 KiB pages (packed: a slot of a segment file), fresh state on this disk, in interleaved
rounds (harness.py). The baseline is a plain Python loop that ``os.pwrite``s the page into
a reused offset of a preallocated file (slot i % WINDOW, as the churn group's slot floor
does): no library can put a page into a slot from Python for less. Contenders:

- ``write() + drop``: ``cache.write(data)`` whose page is dropped at once (its last
  reference goes with the call's result), per page;
- ``write_many(1000) + drop``: ``cache.write_many([data] * 1000)``, then the list is
  dropped, per page;
- ``drop of live pages``: DROP_PAGES live pages are written untimed in setup, and only
  clearing the list that holds them is timed, per page;
- ``drop of plain objects``: the same clear of a list of as many plain objects, what any
  Python object pays to go.

Every contender writes into a new folder a round (diskstate.Disk.folder), closed and
removed after it, untimed; the pages stay in the page cache (no sync), so what is measured
is the caller's cost, not the device's. diskpages removes released pages on its own C
thread (the machine's other core).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diskpages import PageCache

import diskstate
from conftest import ROUNDS, scaled
from harness import record

PAGE = 4 << 10
WINDOW = 1000  # slots of the baseline's file
PER_ROUND = scaled(20_000, 5_000, 50)  # pages written a round
MANY = 1000  # pages per write_many() call
DROP_PAGES = scaled(100_000, 20_000, 50)  # live pages dropped a round
BASELINE = "Python pwrite: a reused offset"


class Folder:
    """A new folder a round under the disk state's parent, removed after the round."""

    def __init__(self, label: str, disk: diskstate.Disk, per_round: int) -> None:
        self.label, self.disk, self.per_round = label, disk, per_round
        self.slug = "".join(c if c.isalnum() else "-" for c in label)
        self.folder: Path | None = None

    def setup(self) -> None:
        self.folder = self.disk.folder(self.slug, own_group=True)

    def finish(self, measured: bool) -> None:
        self.cleanup()

    def drop(self) -> None:
        pass  # nothing is left between rounds

    def cleanup(self) -> None:
        if self.folder is not None:
            diskstate.remove_tree(self.folder)
            self.folder = None


class PythonPwrite(Folder):
    """os.pwrite of page i into slot i % WINDOW of a preallocated file."""

    def __init__(self, label, disk, data: bytes) -> None:
        super().__init__(label, disk, PER_ROUND)
        self.data, self.fd = data, -1

    def setup(self):
        super().setup()
        self.fd = os.open(self.folder / "segment", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.posix_fallocate(self.fd, 0, PAGE * WINDOW)

    def run(self):
        pwrite, fd, data = os.pwrite, self.fd, self.data
        for i in range(self.per_round):
            pwrite(fd, data, (i % WINDOW) * PAGE)

    def cleanup(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().cleanup()


class DiskpagesCost(Folder):
    """A cache in the round's folder, closed (every page gone) in finish, untimed."""

    def __init__(self, label, disk, data: bytes, per_round: int) -> None:
        super().__init__(label, disk, per_round)
        self.data = data
        self.cache: PageCache | None = None

    def setup(self):
        super().setup()
        self.cache = PageCache(self.folder)

    def cleanup(self):
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        super().cleanup()


class WriteDrop(DiskpagesCost):
    def run(self):
        write, data = self.cache.write, self.data
        for _ in range(self.per_round):
            write(data)  # the page's last reference goes with the result


class WriteManyDrop(DiskpagesCost):
    """write_many() of MANY pages (fewer in a smoke run), the list dropped after each call."""

    def __init__(self, label, disk, data, per_round):
        self.batch = min(MANY, per_round)
        super().__init__(label, disk, data, per_round // self.batch * self.batch)

    def run(self):
        write_many, batch = self.cache.write_many, [self.data] * self.batch
        for _ in range(self.per_round // self.batch):
            pages = write_many(batch)
            del pages


class DropLive(DiskpagesCost):
    """Setup writes DROP_PAGES live pages (untimed); run clears the list that holds them."""

    def setup(self):
        super().setup()
        self.pages = self.cache.write_many([self.data] * self.per_round)

    def run(self):
        self.pages.clear()


class DropPlain(Folder):
    """The same clear, of a list of plain objects: what any object pays to go."""

    def setup(self):
        self.pages = [object() for _ in range(self.per_round)]

    def run(self):
        self.pages.clear()


@pytest.mark.parametrize("state", ["fresh"])
def test_page_cost(benchmark, disk, state):
    data = os.urandom(PAGE)
    runners = {
        BASELINE: PythonPwrite(BASELINE, disk, data),
        "write() + drop": WriteDrop("write() + drop", disk, data, PER_ROUND),
        f"write_many({MANY}) + drop": WriteManyDrop(f"write_many({MANY}) + drop", disk, data, PER_ROUND),
        "drop of live pages": DropLive("drop of live pages", disk, data, DROP_PAGES),
        "drop of plain objects": DropPlain("drop of plain objects", disk, DROP_PAGES),
    }
    record(
        benchmark,
        f"page cost: 4 KiB packed pages, {state}",
        runners,
        PER_ROUND,
        BASELINE,
        ROUNDS,
        warmup=disk.warmup,
        before_round=disk.before_round,
        kind="page_cost",
        unit="page",
        size=PAGE,
        state=state,
        window=WINDOW,
        many=runners[f"write_many({MANY}) + drop"].batch,
        drop_pages=DROP_PAGES,
    )
