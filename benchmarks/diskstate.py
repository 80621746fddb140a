"""Fresh and steady state of the file system, made the same for every contender.

What "steady state" is here. ext4 without a journal does not reuse an inode that was
deleted more than one second and less than 60 s ago (360 s while its inode-table block is
still dirty): ``recently_deleted()`` in fs/ext4/ialloc.c, which guards against reusing an
inode whose deletion may not be on disk yet. A new file's inode is sought in the first
block group of its folder's flex group that has any free inode, scanning from the group's
start and stepping over every recently deleted one. After a few thousand files are made and
deleted, every free inode of that group is recently deleted and *each create scans the
whole group*: about 0.9 ms of kernel CPU per create on this machine against about 25 µs in
a fresh group, whatever the file's size and whoever makes it. Any job that makes and drops
more than ~25 files a second (8192 inodes per group / 360 s) lives in that state.

Why one long-lived folder per contender gave untrustworthy ratios. The cost of a create
depends on which block group the folder's files land in, on how many of that group's free
inodes were deleted 1 s to 6 min earlier, and on whether the contender's own deletions fell
in the *same second* as its creates: ext4 compares whole seconds, so inodes freed in the
current second are reused at once, with no scan. Each contender deleted its previous
round's files just before its own round, so whether it paid the scan depended on where a
second boundary fell, and on its own folder's history.

The method here (``Disk``):

- The session's root folder carries ext4's TOPDIR flag (``chattr +T``), so each folder
  made directly in it is placed by the Orlov allocator like a top-level one: in the flex
  group with the fewest folders among those with more free inodes and blocks than average,
  a part of the disk nobody has been deleting in. Such folders are kept (emptied) until
  the session ends, so the allocator does not hand the same group out again meanwhile.
- **Fresh**: a benchmark gets such a parent folder and all contenders make their folders
  in it, so their files land in the same fresh block group; a write benchmark deletes
  nothing until it ends. A benchmark that deletes as it goes would saturate its own group
  within seconds (and favour whoever ran first in a round), so each of its contenders gets
  a new parent of its own every round (``own_group=True``): every round starts fresh.
  In the write benchmarks of big unsynced pages, which keep their files, every round starts
  with all dirty data written back (``os.sync``), so no round pays for another's writeback
  or meets the kernel's dirty-memory throttling because of it.
- **Steady**: one shared parent for the session. Before each benchmark its block group is
  saturated (``saturate``: more empty files than the group has inodes are made, then
  deleted once the next second has begun), so every free inode of the group is recently
  deleted. Every contender makes its folders under that parent, so all of them share the
  saturated group. Before each round every contender drops its previous round's files,
  and the round starts only once the next second has begun (``drop_then_wait``): nobody
  reuses inodes they just freed, and all contenders meet the same saturated group.

Where the flag cannot be set (not ext4, or no permission) the method still runs, without
the spreading; ``filesystem_info`` reports what was found.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import time
import uuid
from pathlib import Path

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000


def spread_subfolders(path: Path) -> bool:
    """Set ext4's TOPDIR flag on ``path``: its subfolders are spread over the disk like
    top-level ones. False where the file system or permissions do not allow it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags | FS_TOPDIR_FL))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def new_folder(parent: Path, label: str) -> Path:
    """A new folder under ``parent`` (0700; never named like a diskpages cache folder, so a
    cache's sweep leaves it alone)."""
    folder = parent / f"{label}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o700)
    return folder


def wait_next_second() -> None:
    """Sleep until the wall clock (the clock of ext4's deletion times) starts a new second."""
    now = time.time()
    time.sleep(1.0 - (now - int(now)) + 0.005)


def _mount_of(path: Path) -> dict[str, str]:
    """The /proc/self/mountinfo entry whose mount point holds ``path`` (the longest match)."""
    target = os.path.realpath(path)
    best: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            point = fields[4]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best.get("mount_point", "")):
                best = {
                    "mount_point": point,
                    "fs_type": rest[0],
                    "device": rest[1],
                    "options": ",".join(dict.fromkeys(fields[5].split(",") + rest[2].split(","))),
                }
    return best


def filesystem_info(path: Path) -> dict:
    """What a reader of the report needs to know about the disk under ``path``."""
    info: dict = dict(_mount_of(path))
    dev = os.path.basename(info.get("device", ""))
    journal = Path(f"/sys/fs/ext4/{dev}/journal_task")
    if info.get("fs_type") == "ext4" and journal.exists():
        info["journal"] = "none" if journal.read_text().strip() == "<none>" else "yes"
    ipg = inodes_per_group(path)
    if ipg:
        info["inodes_per_group"] = ipg
    return info


def inodes_per_group(path: Path) -> int | None:
    """ext4's inodes per block group (total inodes / groups), or None if not ext4."""
    dev = os.path.basename(_mount_of(path).get("device", ""))
    try:
        with open(f"/proc/fs/ext4/{dev}/mb_groups") as f:
            groups = sum(1 for line in f if not line.startswith("#group"))
    except OSError:
        return None
    return os.statvfs(path).f_files // groups if groups else None


def saturate(parent: Path, ipg: int | None, count: int | None = None) -> float:
    """Make every free inode of the block group where ``parent``'s files land recently
    deleted: make a quarter more empty files than a group holds (or ``count``), wait for the
    next second, delete them. Returns the seconds it took."""
    t0 = time.perf_counter()
    if count is None:
        count = int((ipg or 8192) * 1.25)
    folder = new_folder(parent, "saturate")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=fd))
        wait_next_second()
        for i in range(count):
            os.unlink(str(i), dir_fd=fd)
    finally:
        os.close(fd)
    folder.rmdir()
    return time.perf_counter() - t0


def drop_then_wait(runners) -> None:
    """Before a steady-state round: every contender drops its previous round's files, then
    the round waits for the next second (see the module docstring)."""
    for runner in runners.values():
        runner.drop()
    wait_next_second()


class Disk:
    """Where one benchmark's contenders make their folders, and how each round begins, for
    the ``state`` "fresh" or "steady" (see the module docstring)."""

    write_back = True  # os.sync() where figures need it; off in smoke runs (conftest.py)

    def __init__(
        self,
        state: str,
        root: Path,
        shared: Path | None = None,
        fs: str = "thisdisk",
        one_second_rule: bool = True,
        warmup: int | None = None,
    ) -> None:
        self.state, self.root, self.fs = state, root, fs
        self.parent = shared if state == "steady" else self.spread_parent()
        self.write_back_each_round = False  # fresh: os.sync() before every round
        # steady state on a file system without the recently-deleted-inode rule (ext4 with
        # a journal, tmpfs: filesystems.py): no wait for the next second before a round, and
        # ``warmup`` rounds of the group's own workload first (None: the harness default)
        self.one_second_rule = one_second_rule
        self.warmup = warmup

    def spread_parent(self) -> Path:
        """A new folder directly in the (TOPDIR) root: a part of the disk of its own."""
        return new_folder(self.root, self.state)

    def folder(self, label: str, own_group: bool = False) -> Path:
        """A new folder for a contender: under this benchmark's parent; in fresh state with
        ``own_group``, under a new parent of its own (for workloads that delete)."""
        parent = self.spread_parent() if own_group and self.state == "fresh" else self.parent
        return new_folder(parent, label)

    def before_round(self, runners) -> None:
        if self.state == "steady" and self.one_second_rule:
            drop_then_wait(runners)
        elif self.state == "steady":
            for runner in runners.values():
                runner.drop()
        elif self.write_back_each_round and self.write_back:
            os.sync()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
