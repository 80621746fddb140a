"""Writes: diskpages' three write paths against the floor (the same system calls in a C
loop), a plain Python loop and other libraries, per page size, sync mode and disk state,
in interleaved rounds (harness.py).

"fresh": every round writes into new folders under one parent in a part of the disk nobody
deleted from lately; no file is deleted until the group ends, and big unsynced pages are
written back (os.sync) before each round.
"steady": each contender writes into its own long-lived folder under the session's shared
parent, whose block group is saturated with recently deleted inodes; before each round
every contender drops its previous round's pages and the round waits for the next second
(diskstate.py says why this is the fair way on this disk).
Each runs on this disk, a journaled ext4 and a tmpfs (``fs``: filesystems.py, which says
what steady means where there is no recently-deleted-inode rule).

Peers (peers.py) have no sync knob: they appear in the sync="none" groups only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diskpages import PageCache

import diskstate
import filesystems
import peers
from conftest import QUICK, ROUNDS, SMOKE, scaled
from harness import record

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
SYNC_NUM = {"none": 0, "data": 1, "full": 2}

# Pages per round: a round of a few tens of milliseconds at least, and few big pages so the
# full run stays in budget. Steady state makes every create cost ~1 ms (diskstate.py).
FRESH_PER_ROUND = {"4KiB": 200, "64KiB": 100, "1MiB": 16, "16MiB": 2}
FRESH_PER_ROUND_SYNCED = {"4KiB": 60, "64KiB": 50, "1MiB": 12, "16MiB": 2}
STEADY_PER_ROUND = {"4KiB": 30, "64KiB": 30, "1MiB": 12, "16MiB": 2}


class FloorWriter(peers.PeerWriter):
    """The floor: openat + pwrite (+ fdatasync, + folder fsync) + close in a C loop; or the
    same with O_TMPFILE + linkat, the calls diskpages makes when pages are born nameless."""

    def __init__(self, data, n, sync, floor, tmpfile):
        super().__init__(data, n)
        self.sync, self.floor, self.tmpfile = SYNC_NUM[sync], floor, tmpfile
        self.cbuf = floor.ffi.from_buffer(data)
        self.dirfd = -1
        self.written: list[tuple[int, int]] = []

    def open(self, folder):
        super().open(folder)
        self.dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    def write(self, start):
        lib = self.floor.lib
        fn = lib.floor_write_tmpfile if self.tmpfile else lib.floor_write
        rc = fn(self.dirfd, start, self.n, self.cbuf, len(self.data), self.sync)
        assert rc == 0, os.strerror(-rc)
        self.written.append((start, self.n))

    def drop(self):
        for start, n in self.written:
            assert self.floor.lib.floor_unlink(self.dirfd, start, n) == 0
        self.written = []

    def close(self):
        os.close(self.dirfd)


class PythonLoop(peers.PeerWriter):
    """open / write / (os.fdatasync) / close, (os.fsync of the folder) per page."""

    def __init__(self, data, n, sync):
        super().__init__(data, n)
        self.sync = sync
        self.dirfd = -1

    def open(self, folder):
        super().open(folder)
        self.dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    def write(self, start):
        folder, data, sync, dirfd = str(self.folder), self.data, self.sync, self.dirfd
        for i in range(start, start + self.n):
            path = f"{folder}/{i}.page"
            with open(path, "xb", buffering=0) as f:
                f.write(data)
                if sync != "none":
                    os.fdatasync(f.fileno())
            if sync == "full":
                os.fsync(dirfd)
            self.keys.append(path)

    def drop(self):
        for path in self.keys:
            os.unlink(path)
        self.keys = []

    def close(self):
        os.close(self.dirfd)


class DiskpagesWriter(peers.PeerWriter):
    """write() per page, write_many() once per round, or allocate() + fill the view + seal().
    Files go only at drop() (remove_released) or close(): the reaper is kept out of the way."""

    def __init__(self, data, n, sync, kind, pack_max=None):
        super().__init__(data, n)
        self.sync, self.kind, self.pack_max = sync, kind, pack_max
        self.cache: PageCache | None = None

    def open(self, folder):
        super().open(folder)
        packing = {} if self.pack_max is None else {"pack_max": self.pack_max}
        self.cache = PageCache(folder, sync=self.sync, max_delay=3600, batch=2**31 - 1, **packing)

    def write(self, start):
        cache, data, n, pages = self.cache, self.data, self.n, self.keys
        if self.kind == "write_many()":
            pages.extend(cache.write_many([data] * n))
        elif self.kind == "allocate()":
            for _ in range(n):
                builder = cache.allocate(len(data))
                builder.view()[:] = data
                pages.append(builder.seal())
        else:
            write = cache.write
            for _ in range(n):
                pages.append(write(data))

    def drop(self):
        self.keys = []
        self.cache.remove_released()

    def close(self):
        self.keys = []
        self.cache.close()


class Contender:
    """A writer in the harness's rounds. Fresh: a new folder (and writer) every round, all
    kept until cleanup, or with ``discard_rounds`` removed right after its round (untimed),
    before the next round's write-back could reach the device. Steady: one folder and
    writer; ``drop()`` before each round."""

    discard_rounds = False

    def __init__(self, label, make_writer, disk: diskstate.Disk, steady: bool, n: int):
        self.label, self.make_writer, self.disk, self.steady = label, make_writer, disk, steady
        self.per_round = n
        self.writers: list[peers.PeerWriter] = []
        self.folders: list[Path] = []
        self.next = 0
        self.inode = 0  # of its first folder: which block group its files land in

    def setup(self):
        if self.steady and self.writers:
            return
        slug = "".join(c if c.isalnum() else "-" for c in self.label)
        self.folders.append(self.disk.folder(slug))
        self.inode = self.inode or self.folders[0].stat().st_ino
        self.writers.append(self.make_writer())
        self.writers[-1].open(self.folders[-1])

    def run(self):
        self.writers[-1].write(self.next)
        self.next += self.per_round

    def finish(self, measured):
        if self.discard_rounds and not self.steady:
            writer = self.writers.pop()
            writer.drop()
            writer.close()
            diskstate.remove_tree(self.folders.pop())

    def drop(self):
        if self.writers:
            self.writers[-1].drop()

    def cleanup(self):
        for writer in self.writers:
            writer.drop()
            writer.close()
        for folder in self.folders:
            diskstate.remove_tree(folder)


def contenders(floor, data, n, sync, disk, steady):
    makers = {
        "floor": lambda: FloorWriter(data, n, sync, floor, tmpfile=False),
        "floor O_TMPFILE": lambda: FloorWriter(data, n, sync, floor, tmpfile=True),
        "python loop": lambda: PythonLoop(data, n, sync),
        "write()": lambda: DiskpagesWriter(data, n, sync, "write()"),
        "write_many()": lambda: DiskpagesWriter(data, n, sync, "write_many()"),
        "allocate()": lambda: DiskpagesWriter(data, n, sync, "allocate()"),
        # the default packs pages up to 256 KiB into segment files; this is a file per page
        "write() pack_max=0": lambda: DiskpagesWriter(data, n, sync, "write()", pack_max=0),
    }
    if sync == "none":
        for peer in peers.PEERS:
            if peers.missing_reason(peer) is None:
                makers[peer] = lambda cls=peers.PEER_CLASSES[peer]: cls(data, n)
    return {label: Contender(label, make, disk, steady, n) for label, make in makers.items()}


def skip_reason(size=None, sync=None, state=None, **_) -> str | None:
    """Cases a short run leaves out (conftest.py skips them before their fixtures run)."""
    if size is None:
        return None
    if SMOKE and size != "4KiB":
        return "smoke run: 4 KiB pages only"
    if QUICK and not SMOKE and sync != "none" and size in ("64KiB", "16MiB"):
        return "quick run: 64 KiB and 16 MiB pages are measured with sync=none only"
    if QUICK and not SMOKE and state == "steady" and sync != "none":
        return "quick run: steady state is measured with sync=none only"
    return None


@pytest.mark.parametrize("sync", list(SYNC_NUM))
@pytest.mark.parametrize("size", list(SIZES))
def test_write(benchmark, floor, disk, inodes_per_group, size, sync, state, fs):
    steady = state == "steady"
    ipg = inodes_per_group if fs.name == filesystems.THISDISK else diskstate.inodes_per_group(fs.root)
    # Files are kept, so big unsynced pages pile up dirty data that throttles later rounds:
    # write it back before each round (diskstate.Disk). Small pages leave a few MB a round.
    disk.write_back_each_round = sync == "none" and SIZES[size] >= 1 << 20
    table = STEADY_PER_ROUND if steady else FRESH_PER_ROUND if sync == "none" else FRESH_PER_ROUND_SYNCED
    # quick: half the full count, a quarter for synced 1 MiB pages (which reach the device:
    # 0.27 GB a group at half)
    quick = table[size] // 4 if sync != "none" and size == "1MiB" else table[size] // 2
    n = scaled(table[size], max(2, quick), 2)
    data = os.urandom(SIZES[size])
    runners = contenders(floor, data, n, sync, disk, steady)
    # Quick: big unsynced pages are never written back. A round's files go as it ends, so
    # the write-back before the next round has nothing of them to write (16 MiB pages wrote
    # 1.9 GB a file system in a quick run otherwise). A full run keeps them on this disk
    # only: the ext4 image and the tmpfs hold a few GB, which a full run's 16 MiB pages fill
    # (ENOSPC). The timed writes fill the page cache alike either way.
    keep = not QUICK and fs.name == filesystems.THISDISK
    for runner in runners.values():
        runner.discard_rounds = disk.write_back_each_round and not keep
    missing = {p: r for p in peers.PEERS if sync == "none" and (r := peers.missing_reason(p))}
    record(
        benchmark,
        f"write {size} sync={sync} {state} on {fs.label}",
        runners,
        n,
        "floor",
        ROUNDS,
        warmup=disk.warmup,
        before_round=disk.before_round,
        kind="write",
        unit="page",
        size=SIZES[size],
        size_label=size,
        sync=sync,
        state=state,
        fs=fs.name,
        fs_info=fs.info,
        missing_peers=missing,
    )
    # where each contender's files landed: one block group for all is the fairness check
    benchmark.extra_info["block_groups"] = {
        label: (r.inode - 1) // ipg if ipg else None for label, r in runners.items()
    }


@pytest.mark.parametrize("peer", peers.PEERS)
def test_peer_available(peer):
    """A peer that cannot be imported is left out of the write groups: say so here (-rs)."""
    reason = peers.missing_reason(peer)
    if reason:
        pytest.skip(reason)
