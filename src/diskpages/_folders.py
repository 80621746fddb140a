"""Cache folders on disk: where they go, who owns them, when they are swept.

Roots and cache folders are made safely in a temp folder every user can write to, locked
for a cache's whole life, and swept once the process that made them is gone.

A root holds one folder per cache, named ``<pid>-<created, hex seconds>-<random>``. The
cache holds an exclusive ``flock`` on its folder's directory fd for its whole life; the
kernel drops it when the process dies, however it dies, so "not locked" means "orphaned"
whatever pid the name shows (pids are reused; locks are not). A forked child inherits the
fd and so keeps the lock: a folder is swept only once every process that could read it is
gone.

The race between a new cache and a sweep is closed by a lock on the root itself: a cache
takes it shared from ``mkdir`` until its folder is locked; a sweep takes it exclusively
while it picks the unlocked folders (and releases it before it removes them). A cache's
folder is made, locked and owned in one C call (``_bindings.cache_create``), and every fd
opened here lives in a box whose finalizer closes it: an exception at any bytecode (a
signal handler's) leaves no folder, no fd and no lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from . import _bindings as native
from .errors import UnsafeRootError

__all__ = ["default_root", "sweep", "FolderInfo", "list_folders"]

# Matched with fullmatch and ASCII classes only: a sweep deletes what matches, so a user's
# folder must not pass for a cache's with a final newline ("$" matches before one) or a pid
# in other scripts' digits ("\d" matches those, and int() reads them).
_FOLDER = re.compile(r"([0-9]+)-([0-9a-f]{8})-[0-9a-f]{8}")


def default_root() -> Path:
    """``$DISKPAGES_ROOT``, else ``<tempdir>/diskpages-<uid>``: one root per user."""
    env = os.environ.get("DISKPAGES_ROOT")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"diskpages-{os.getuid()}"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    # absolute, so that a later os.chdir() cannot move page paths or close()'s rmdir
    return (Path(root) if root is not None else default_root()).absolute()


@overload
def open_root(root: Path, create: Literal[True]) -> Any: ...
@overload
def open_root(root: Path, create: bool) -> Any | None: ...
def open_root(root: Path, create: bool) -> Any | None:
    """An fd box of the root (``box[0]``: see _bindings.open_dir), made (mode 0700) if
    missing and ``create``; None if it is missing and not ``create``. Refuses a root that is
    a symlink, is not ours, or is writable by others: the default root lives in a folder
    every user can write to."""
    if create:
        os.makedirs(root, mode=0o700, exist_ok=True)  # OSError names the path
    try:
        box = native.open_at(str(root))
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(root):
            raise UnsafeRootError(f"the root {root} is a symbolic link; it is not followed") from None
        raise
    try:
        check_root(box[0], root)
    except BaseException:
        native.drop_now(box)
        raise
    return box


def check_root(fd: int, root: Path) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise UnsafeRootError(
            f"the root {root} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
            "choose another root"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Not "chmod go-w": a root others can write to is most often /tmp, which they need.
        private = (
            f"a private folder of your own under it, such as {root / 'myapp'} (diskpages makes it, mode 0700)"
        )
        if root != resolve_root(None):
            advice = f"use as the root {private}, or the default root ({default_root()})"
        elif os.environ.get("DISKPAGES_ROOT"):
            advice = f"set DISKPAGES_ROOT to {private}"
        else:
            advice = f"use as the root {private}"
        raise UnsafeRootError(
            f"the root {root} can be written by others (mode {stat.S_IMODE(st.st_mode):o}), so "
            f"diskpages makes no cache folder in it; {advice}"
        )


@dataclass(frozen=True)
class FolderInfo:
    """One cache folder under a root, as ``diskpages ls`` shows it."""

    path: Path
    pid: int  #: the process that made it (a live one may be a forked child of it)
    alive: bool  #: its lock is held: some process still has the cache open
    pages: int
    nbytes: int  #: bytes of every file in it
    created: float  #: seconds since the epoch


def _cache_folders(root_fd: int) -> Iterator[tuple[str, int, int]]:
    """(name, pid, created) of each entry that looks like a cache folder: a real directory
    (never a symlink) whose name has our shape."""
    with os.scandir(root_fd) as entries:
        for entry in entries:
            m = _FOLDER.fullmatch(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                yield entry.name, int(m.group(1)), int(m.group(2), 16)


def _open_owned(root_fd: int, name: str) -> Any | None:
    """An fd box of the folder if it is still a directory we own; else None (gone, a
    symlink swapped in, someone else's)."""
    try:
        box = native.open_at(name, root_fd)
    except OSError:
        return None
    try:
        if os.fstat(box[0]).st_uid == os.geteuid():
            return box
    except OSError:
        pass
    native.drop_now(box)
    return None


def _try_lock(fd: int) -> bool:
    """Whether we took the folder's lock: False if a live cache holds it (or, on any other
    error, as if one did: a folder we cannot lock is never touched)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _contents(fd: int) -> tuple[int, int]:
    """(page count, bytes of every file) of an open folder; nothing followed."""
    pages = nbytes = 0
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if entry.name.endswith(".slots"):
                packed, packed_bytes = _segment_contents(fd, entry.name, st.st_size)
                pages += packed
                nbytes += packed_bytes
            else:
                nbytes += st.st_size
                pages += entry.name.endswith(".page")
    return pages, nbytes


def _segment_contents(dirfd: int, name: str, size: int) -> tuple[int, int]:
    """(pages, their bytes) of a segment file of packed pages: the slots whose tag holds a
    page (csrc/diskpages.h, dp_tag). A segment that is not one counts as nothing."""
    try:
        slot_size = int(name.removesuffix(".slots"))
        box = native.open_at(name, dirfd, directory=False)
    except (ValueError, OSError):
        return 0, 0
    pages = nbytes = 0
    try:
        fd = box[0]
        slots = max(0, size - native.TAGS_BYTES) // slot_size if slot_size > 0 else 0
        step = 32768  # tags a read
        for first in range(0, slots, step):
            count = min(step, slots - first)
            raw = os.pread(fd, count * native.TAG_BYTES, first * native.TAG_BYTES)
            for page_id, page_bytes, _, _ in struct.iter_unpack("<QQQQ", raw[: len(raw) // 32 * 32]):
                if page_id:
                    pages += 1
                    nbytes += page_bytes
    except OSError:
        pass
    finally:
        native.drop_now(box)
    return pages, nbytes


def _probe(root_fd: int) -> list[tuple[str, int, int, Any, bool]]:
    """(name, pid, created, fd box, orphaned) of each cache folder we own. For an orphaned
    one we hold its lock (and so must close the fd, which drops it: native.drop_now, or the
    box's finalizer). Done under the root's lock taken exclusively: a folder between its
    mkdir and its lock must not be probed, or the sweep would take it or the cache making
    it would find its own lock taken."""
    probed: list[tuple[str, int, int, Any, bool]] = []
    fcntl.flock(root_fd, fcntl.LOCK_EX)
    try:
        for name, pid, created in _cache_folders(root_fd):
            box = _open_owned(root_fd, name)
            if box is not None:
                probed.append((name, pid, created, box, _try_lock(box[0])))
    except BaseException:
        _close_all(probed)
        raise
    finally:
        fcntl.flock(root_fd, fcntl.LOCK_UN)
    return probed


def _close_all(probed: list[tuple[str, int, int, Any, bool]]) -> None:
    for *_, box, _orphaned in probed:
        native.drop_now(box)  # drops the lock we may have taken


def list_folders(root: str | os.PathLike[str] | None = None) -> list[FolderInfo]:
    """Every cache folder under the root, live or orphaned, oldest first."""
    root_path = resolve_root(root)
    root_box = open_root(root_path, create=False)
    if root_box is None:
        return []
    out: list[FolderInfo] = []
    try:
        probed = _probe(root_box[0])
        try:
            for name, pid, created, box, orphaned in probed:
                if orphaned:
                    fcntl.flock(box[0], fcntl.LOCK_UN)  # ls only looks: let a sweep have it
                pages, nbytes = _contents(box[0])
                out.append(FolderInfo(root_path / name, pid, not orphaned, pages, nbytes, float(created)))
        finally:
            _close_all(probed)
    finally:
        native.drop_now(root_box)
    return sorted(out, key=lambda f: (f.created, f.path.name))


@dataclass(frozen=True)
class SweepResult:
    removed: list[FolderInfo]
    failed: list[tuple[FolderInfo, OSError]]


def sweep_folders(root: str | os.PathLike[str] | None = None, *, dry_run: bool = False) -> SweepResult:
    """Remove every orphaned cache folder under the root (see the module docstring)."""
    root_path = resolve_root(root)
    root_box = open_root(root_path, create=False)
    if root_box is None:
        return SweepResult([], [])
    try:
        return sweep_at(root_box[0], root_path, dry_run=dry_run)
    finally:
        native.drop_now(root_box)


def sweep_at(root_fd: int, root_path: Path, *, dry_run: bool = False) -> SweepResult:
    probed = _probe(root_fd)
    removed, failed = [], []
    try:
        for name, pid, created, box, orphaned in probed:
            if not orphaned:
                continue  # a live cache's: never touched
            try:
                pages, nbytes = _contents(box[0])
                info = FolderInfo(root_path / name, pid, False, pages, nbytes, float(created))
                if not dry_run:
                    native.empty_folder(box[0], str(info.path))
                    os.rmdir(name, dir_fd=root_fd)
                removed.append(info)
            except OSError as e:
                failed.append((FolderInfo(root_path / name, pid, False, 0, 0, float(created)), e))
    finally:
        _close_all(probed)  # drops the locks we took
    return SweepResult(removed, failed)


def sweep(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the folders that caches of dead processes left under ``root`` (the default
    root if None) and return their paths. A folder whose cache is open in any process is
    never touched, whatever its pid. Folders that cannot be emptied are left as they are."""
    return [info.path for info in sweep_folders(root).removed]
