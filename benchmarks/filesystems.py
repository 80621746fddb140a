"""The file systems the headline groups run on, side by side (the project's issue 14).

This machine's own disk is unusual: ext4 *without a journal*, mounted ``discard``. Figures
taken only there say little about a common disk, so the headline groups (writes, removal,
cleanup, small-page churn) also run on two file systems the session makes itself:

- ``thisdisk``: the session's bench root on the disk that holds it (conftest.bench_root).
- ``ext4-journal``: a sparse image file under the bench base, ``mkfs.ext4 -q -F`` (journal
  on, the defaults), mounted with ``mount -o loop`` at a fresh temporary mount point with
  default options (so no ``discard``). The loop device writes through the image file's
  page cache onto this disk: what is measured is ext4's own work with a journal (jbd2
  commits, no recently-deleted inode scan), not a different device.
- ``tmpfs``: ``mount -t tmpfs -o size=4g``: memory only, no device, no journal.

Each is made on first use and unmounted and deleted when the session ends, also after a
failure or Ctrl-C (pytest tears session fixtures down then; an atexit hook is the backstop).
A session killed outright leaves its mounts behind: the next session removes those whose
process is gone (``sweep_stale``). Where one cannot be made (not root, no loop device,
mkfs.ext4 missing) its cases are skipped with that reason.

DISKPAGES_BENCH_FS=thisdisk,ext4-journal,tmpfs picks which run (default: all three); a smoke
run (DISKPAGES_BENCH_SMOKE=1, what CI runs) uses this disk only: fast, and no root needed.

"Steady" elsewhere. diskstate's steady state is ext4-without-journal's recently deleted
inodes (diskstate.py). With a journal ext4 does not check for recently deleted inodes at
all (it relies on the journal instead), and tmpfs has no inode table, so there steady
means "after the same churn has run for a while in that folder": every contender works in a
long-lived folder under one shared parent, and the group first runs STEADY_WARMUP extra
rounds of its own workload there, untimed (harness warmup), before the measured rounds.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import diskstate

THISDISK, EXT4_JOURNAL, TMPFS = "thisdisk", "ext4-journal", "tmpfs"
NAMES = [THISDISK, EXT4_JOURNAL, TMPFS]
LABELS = {THISDISK: "this disk", EXT4_JOURNAL: "ext4-journal", TMPFS: "tmpfs"}
IMAGE_BYTES = 4 << 30  # sparse: only what the benchmarks write takes room
TMPFS_SIZE = "4g"
MOUNT_PREFIX = "diskpages-bench-mnt-"  # + pid + "-": sweep_stale knows a dead session's
INFO: dict[str, dict] = {}  # per name: filesystem_info once made, or {"skipped": why}


def selected(smoke: bool) -> list[str]:
    """The names DISKPAGES_BENCH_FS picks (all three by default; this disk alone in a smoke
    run). An unknown name is an error, not a silent skip."""
    if smoke:
        return [THISDISK]
    raw = os.environ.get("DISKPAGES_BENCH_FS", "")
    names = [n.strip() for n in raw.split(",") if n.strip()] or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"DISKPAGES_BENCH_FS: unknown {unknown}; choose from {','.join(NAMES)}")
    return names


def not_selected_reason(name: str, smoke: bool) -> str | None:
    if name in selected(smoke):
        return None
    if smoke:
        return f"smoke run: this disk only ({LABELS[name]} needs root and a mount)"
    return f"{LABELS[name]} not in DISKPAGES_BENCH_FS={os.environ.get('DISKPAGES_BENCH_FS', '')}"


class FileSystem:
    """One file system's session folder (``root``, its subfolders spread over the device
    where ext4 allows) and what the report says of it."""

    def __init__(self, name: str, root: Path, spread: bool) -> None:
        self.name, self.label, self.root, self.spread = name, LABELS[name], root, spread
        self.steady_parent: Path | None = None  # made on first use (not on this disk)
        self.info = diskstate.filesystem_info(root)
        self.info["folders_spread"] = spread
        INFO[name] = self.info

    @property
    def one_second_rule(self) -> bool:
        """Whether diskstate's steady state (recently deleted inodes) exists here."""
        return self.info.get("fs_type") == "ext4" and self.info.get("journal") == "none"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _why_not(name: str) -> str | None:
    """Why ``name`` cannot be mounted here, or None."""
    if os.geteuid() != 0:
        return f"{LABELS[name]}: not root (mounting needs root)"
    if not shutil.which("mount") or not shutil.which("umount"):
        return f"{LABELS[name]}: mount/umount not found"
    if name == EXT4_JOURNAL:
        if not shutil.which("mkfs.ext4"):
            return "ext4-journal: mkfs.ext4 not found (apt-get install e2fsprogs)"
        if not Path("/dev/loop-control").exists():
            return "ext4-journal: no loop devices (/dev/loop-control is missing)"
    return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, or a process being killed, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X", "x")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _loop_backing_files() -> set[str]:
    """The image files loop devices still hold (a lazily unmounted one until it is let go)."""
    files = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            files.add(backing.read_text().strip().removesuffix(" (deleted)"))
        except OSError:
            pass
    return files


def sweep_stale(base: Path) -> list[str]:
    """Unmount and delete what a killed session of this suite left (its mount points and
    image files carry its pid; only those of processes that are gone are touched, and an
    image only once no loop device holds it any more)."""
    done = []
    pattern = re.compile(re.escape(MOUNT_PREFIX) + r"(\d+)-")
    dead: dict[int, bool] = {}

    def is_dead(pid: int) -> bool:
        if pid not in dead:
            dead[pid] = not _alive(pid)
        return dead[pid]

    for point in _mount_points():
        parent = os.path.basename(os.path.dirname(point))
        m = pattern.match(parent)
        if m and is_dead(int(m.group(1))):
            if _run("umount", point).returncode != 0:
                _run("umount", "-l", point)
            done.append(point)
    mounted = _mount_points()
    for folder in Path(tempfile.gettempdir()).glob(MOUNT_PREFIX + "*"):
        m = pattern.match(folder.name)
        if not m or not is_dead(int(m.group(1))):
            continue
        for child in folder.iterdir():  # the mount points, empty once unmounted
            if str(child) not in mounted:
                try:
                    child.rmdir()
                except OSError:
                    pass
        try:
            folder.rmdir()
        except OSError:
            pass
    held = _loop_backing_files()
    for image in (base / "images").glob("ext4-journal-*.img"):
        m = re.match(r"ext4-journal-(\d+)-", image.name)
        if m and is_dead(int(m.group(1))) and str(image) not in held:
            image.unlink(missing_ok=True)
            done.append(str(image))
    return done


class Mounts:
    """The session's file systems, made on first use; ``close()`` undoes all of them."""

    def __init__(self, base: Path, thisdisk_root: Path, thisdisk_spread: bool) -> None:
        self.base = base
        self.made: dict[str, FileSystem] = {}
        self.failed: dict[str, str] = {}
        self.undo: list[tuple[str, str]] = []  # ("umount", point) / ("rmdir", p) / ("unlink", p)
        self.tmp: Path | None = None
        self.made[THISDISK] = FileSystem(THISDISK, thisdisk_root, thisdisk_spread)
        self.stale = sweep_stale(base)
        atexit.register(self.close)

    def get(self, name: str) -> FileSystem | str:
        """The file system, or why it cannot be had (a skip reason)."""
        if name in self.made:
            return self.made[name]
        if name in self.failed:
            return self.failed[name]
        why = _why_not(name)
        if why is None:
            try:
                point = self._mount(name)
                root = point / "diskpages-bench" / uuid.uuid4().hex[:8]
                root.mkdir(mode=0o700, parents=True)
                self.made[name] = FileSystem(name, root, diskstate.spread_subfolders(root))
                return self.made[name]
            except (OSError, subprocess.SubprocessError) as e:
                why = f"{LABELS[name]}: could not be made ({e})"
        self.failed[name] = why
        INFO[name] = {"skipped": why}
        return why

    def _mount(self, name: str) -> Path:
        if self.tmp is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{MOUNT_PREFIX}{os.getpid()}-"))
            self.undo.append(("rmdir", str(self.tmp)))
        point = self.tmp / name
        point.mkdir(mode=0o700)
        self.undo.append(("rmdir", str(point)))
        if name == EXT4_JOURNAL:
            images = self.base / "images"
            images.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.undo.append(("rmdir", str(images)))  # once empty (another session's may not be)
            image = images / f"ext4-journal-{os.getpid()}-{uuid.uuid4().hex[:8]}.img"
            with open(image, "xb") as f:
                f.truncate(IMAGE_BYTES)
            self.undo.append(("unlink", str(image)))
            made = _run("mkfs.ext4", "-q", "-F", str(image))
            if made.returncode != 0:
                raise OSError(f"mkfs.ext4 failed: {made.stderr.strip()}")
            cmd = ["mount", "-o", "loop", str(image), str(point)]
        else:
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(point)]
        mounted = _run(*cmd)
        if mounted.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {mounted.stderr.strip()}")
        self.undo.append(("umount", str(point)))
        return point

    def close(self) -> None:
        """Best effort, newest first: unmount (lazily if busy; a loop mount frees its loop
        device as it goes), then delete mount points and image files."""
        if self.made.get(THISDISK) is not None:
            self.made = {THISDISK: self.made[THISDISK]}
        while self.undo:
            what, path = self.undo.pop()
            try:
                if what == "umount":
                    if _run("umount", path).returncode != 0:
                        _run("umount", "-l", path)
                elif what == "rmdir":
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except (OSError, subprocess.SubprocessError):
                pass
