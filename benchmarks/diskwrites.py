"""What the run writes to the device under the bench root, per test and in all.

The kernel's own count (/proc/diskstats, sectors written, 512 bytes each) of the block
device that holds the temporary folder: the loop-mounted ext4's image lives there too, so
its writes are counted as well. Each test's share is read after a sync, so that its
dirty pages are charged to it and not to the next one. conftest.py prints the biggest
writers and the total at the end of the session and records the total (report.py).

The count is the device's: on a shared machine other processes' writes land in it too
(a test on a tmpfs that shows writes is the tell). The session's own process's count
(/proc/self/io: bytes it dirtied, less those dropped before write-back) is printed beside
it: it leaves out the dask workers' spill, the journal and the loop image's own traffic,
but nobody else's writes enter it.
"""

from __future__ import annotations

import os
from pathlib import Path


def device_of(path: Path) -> tuple[int, int] | None:
    """The (major, minor) that holds ``path`` (or its nearest existing parent: the bench
    root may not be made yet), if /proc/diskstats counts it."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.stat(path)
    key = (os.major(st.st_dev), os.minor(st.st_dev))
    return key if written_sectors(key) is not None else None


def written_sectors(key: tuple[int, int] | None) -> int | None:
    if key is None:
        return None
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if (int(fields[0]), int(fields[1])) == key:
                    return int(fields[9])
    except OSError:
        pass
    return None


def own_written() -> int | None:
    """Bytes this process sent (or will send) to storage: write_bytes less
    cancelled_write_bytes of /proc/self/io."""
    try:
        with open("/proc/self/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        return int(io["write_bytes"]) - int(io["cancelled_write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


class Meter:
    """Bytes written to one device, per test id, and since the meter was made."""

    def __init__(self, path: Path, sync: bool):
        self.key = device_of(path)
        self.sync = sync
        self.per_test: dict[str, int] = {}
        self.start = written_sectors(self.key)
        self.own_start = own_written()

    def reading(self) -> int | None:
        if self.sync:
            os.sync()  # twice: the loop device's image is dirtied by the first
            os.sync()
        return written_sectors(self.key)

    def charge(self, nodeid: str, before: int | None) -> None:
        after = self.reading()
        if before is not None and after is not None:
            self.per_test[nodeid] = (after - before) * 512

    def total(self) -> int | None:
        now = written_sectors(self.key)
        return None if self.start is None or now is None else (now - self.start) * 512

    def lines(self, top: int = 12) -> list[str]:
        total = self.total()
        if total is None:
            return ["written to the disk: not counted (no /proc/diskstats entry for the bench root)"]
        biggest = sorted(self.per_test.items(), key=lambda kv: -kv[1])[:top]
        own = own_written()
        mine = (
            ""
            if own is None or self.own_start is None
            else f" (by this process: {(own - self.own_start) / 1e9:.2f} GB)"
        )
        out = [f"written to the disk over the run: {total / 1e9:.2f} GB{mine}; the biggest writers:"]
        out += [f"  {nbytes / 1e9:6.2f} GB  {nodeid}" for nodeid, nbytes in biggest if nbytes > 0]
        return out
