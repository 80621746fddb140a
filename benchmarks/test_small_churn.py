"""Small-page churn in steady state: a window of live pages, each step writes one page and
drops the oldest, so the live data never grows while pages come and go all the time.

Per page size (4, 16, 64 and 256 KiB), disk state and file system (``fs``: this disk, a
journaled ext4, a tmpfs; filesystems.py), in interleaved rounds (harness.py), the time per
step of:

- diskpages with its default settings (``PageCache(folder)``, ``cache.write(data)``, the
  oldest dropped by losing its last reference), and with ``pack_max=0`` (a file per page).
  Until ``pack_max`` exists (``PACK_MAX``) both are today's one path: a file per page;
- for fresh 4 KiB pages also ``write_many()`` of WRITE_MANY pages a step-batch;
- two C floors (floor.py): a file per page (openat + pwrite + close, unlinkat of the
  oldest) and slots in one preallocated segment file (pwrite into the oldest's slot);
- the slot floor from Python (``os.pwrite`` into the oldest's slot of the same file), the
  least a Python program pays to put a page into a slot;
- a plain Python loop (``open(p, "wb")`` + ``write``, ``os.unlink`` of the oldest);
- diskcache (``Cache.set``/``delete``) and zict.File (setitem/delitem).

States. *fresh*: every round each contender gets a new folder (on this disk in a part of
the disk of its own: diskstate.py), fills the window (untimed), then churns. *steady*: one
long-lived folder per contender under the shared steady parent (on this disk its block
group saturated with recently deleted inodes, diskstate.py); before the rounds each
contender fills its window and churns for SEASON steps there (the trace below, untimed),
and the window carries over from round to round. Steady runs on tmpfs too: there it is the
libraries' own state after churn (a SQLite file with free pages, reused segment slots)
that differs from fresh, not the file system's.

Bytes on disk. Before the rounds each contender runs the same churn once more from an empty
folder (fresh: a throwaway one; steady: the seasoning pass above), and after every few
steps the bytes its folder's files occupy (st_blocks * 512, summed) are sampled, sampling
untimed: ``extra_info["traces"]``, plotted by report.py beside the cleanup plots. The
bytes after every measured round are kept as well (``end_bytes``).

Removal in diskpages runs in its own C thread (batch 64 or 50 ms), on the machine's other
core: the caller's time per step is what is measured, as the library intends.
"""

from __future__ import annotations

import collections
import inspect
import os
import time
from pathlib import Path

import pytest

from diskpages import PageCache

import diskstate
import peers
from conftest import ROUNDS, SMOKE, scaled
from harness import record

SIZES = {"4KiB": 4 << 10, "16KiB": 16 << 10, "64KiB": 64 << 10, "256KiB": 256 << 10}
WINDOW = scaled(1000, 300, 8)  # live pages
# Steps (pages written and dropped) per round. Quick: fewer for bigger pages. The slot
# contenders' segments stay dirty while they churn, so the kernel writes them back every
# 30 s: a group's bytes to the device grow with its length (a steady 256 KiB group wrote
# 1 GB at 600 steps).
STEPS = {
    "4KiB": scaled(2000, 600, 16),
    "16KiB": scaled(2000, 600, 16),
    "64KiB": scaled(2000, 300, 16),
    "256KiB": scaled(2000, 150, 16),
}
SEASON = scaled(3, 1, 1) * WINDOW  # steps of churn after the fill, in the trace pass
# diskcache keeps values under 32 KiB in SQLite, whose checkpoints fsync ~100 KB a step of
# 16 KiB pages (0.4-0.6 GB a group in a quick run): quick runs churn it at 4 KiB only, for
# a third of the steps (its ratios are per step)
DISKCACHE_SIZES = scaled(list(SIZES), ["4KiB"], ["4KiB"])
DISKCACHE_STEPS = {size: scaled(steps, steps // 3, steps) for size, steps in STEPS.items()}
WRITE_MANY = scaled(50, 50, 4)  # pages per write_many() call
SAMPLES = scaled(150, 100, 8)  # bytes-on-disk samples per trace
STEADY_ON_TMPFS = True  # conftest.py: steady means something on tmpfs here (see above)
PACK_MAX = "pack_max" in inspect.signature(PageCache.__init__).parameters
PEERS = ["diskcache", "zict.File"]
BASELINE = "C floor: file per page"
PYTHON_SLOTS = "Python pwrite: slots in one file"


def bytes_on_disk(folder: Path) -> tuple[int, int, int]:
    """(bytes of the files under ``folder``, bytes of its folders, number of files): st_blocks
    * 512, so holes and preallocation count as the file system counts them."""
    files = dirs = count = 0
    stack = [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile (diskpages' reaper thread)
                continue
            if entry.is_dir(follow_symlinks=False):
                dirs += st.st_blocks * 512
                stack.append(entry.path)
            else:
                files += st.st_blocks * 512
                count += 1
    return files, dirs, count


# -- the contenders: fill(n) writes n pages, churn(n) writes n and drops the n oldest -------


class Churner:
    def __init__(self, data: bytes, window: int) -> None:
        self.data, self.window_size = data, window
        self.folder: Path | None = None
        self.next = 0  # the next page's number

    def open(self, folder: Path) -> None:
        self.folder = folder

    def fill(self, n: int) -> None:
        raise NotImplementedError

    def churn(self, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Diskpages(Churner):
    def __init__(self, data, window, pack_max=None, many=False):
        super().__init__(data, window)
        self.pack_max, self.many = pack_max, many
        self.pages: collections.deque = collections.deque()
        self.cache: PageCache | None = None

    def open(self, folder):
        super().open(folder)
        kwargs = {"pack_max": self.pack_max} if self.pack_max is not None and PACK_MAX else {}
        self.cache = PageCache(folder, **kwargs)

    def fill(self, n):
        write, data = self.cache.write, self.data
        self.pages.extend(write(data) for _ in range(n))

    def churn(self, n):
        if self.many:
            return self.churn_many(n)
        write, data, append, popleft = self.cache.write, self.data, self.pages.append, self.pages.popleft
        for _ in range(n):
            append(write(data))
            popleft()  # the oldest page's last reference goes here

    def churn_many(self, n):
        write_many, extend, popleft = self.cache.write_many, self.pages.extend, self.pages.popleft
        batch = [self.data] * WRITE_MANY
        while n > 0:
            k = min(n, WRITE_MANY)
            extend(write_many(batch if k == WRITE_MANY else batch[:k]))
            for _ in range(k):
                popleft()
            n -= k

    def close(self):
        self.pages.clear()
        if self.cache is not None:
            self.cache.close()
            self.cache = None


class FloorFiles(Churner):
    """C: openat + pwrite + close of page i, unlinkat of page i - window."""

    def __init__(self, data, window, floor):
        super().__init__(data, window)
        self.floor, self.cbuf, self.dirfd = floor, floor.ffi.from_buffer(data), -1

    def open(self, folder):
        super().open(folder)
        self.dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    def fill(self, n):
        rc = self.floor.lib.floor_write(self.dirfd, self.next, n, self.cbuf, len(self.data), 0)
        assert rc == 0, os.strerror(-rc)
        self.next += n

    def churn(self, n):
        lib = self.floor.lib
        rc = lib.floor_churn_files(self.dirfd, self.next, n, self.window_size, self.cbuf, len(self.data))
        assert rc == 0, os.strerror(-rc)
        self.next += n

    def close(self):
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1


class FloorSlots(Churner):
    """C: one segment file of ``window`` slots (posix_fallocate'd once); page i is written
    into slot i % window, over the oldest page."""

    def __init__(self, data, window, floor):
        super().__init__(data, window)
        self.floor, self.cbuf, self.fd = floor, floor.ffi.from_buffer(data), -1
        self.slot = -(-len(data) // 4096) * 4096

    def open(self, folder):
        super().open(folder)
        self.fd = os.open(folder / "segment", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.posix_fallocate(self.fd, 0, self.slot * self.window_size)

    def churn(self, n):
        lib = self.floor.lib
        rc = lib.floor_churn_slots(
            self.fd, self.next, n, self.window_size, self.cbuf, len(self.data), self.slot
        )
        assert rc == 0, os.strerror(-rc)
        self.next += n

    fill = churn  # the first window's slots are written the same way

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PythonSlots(FloorSlots):
    """FloorSlots' file and slot reuse from a plain Python loop: ``os.pwrite`` of page i
    into slot i % window. The least a Python program pays to put a page into a slot."""

    def __init__(self, data, window):
        Churner.__init__(self, data, window)
        self.fd = -1
        self.slot = -(-len(data) // 4096) * 4096

    def churn(self, n):
        pwrite, fd, data, slot, window = os.pwrite, self.fd, self.data, self.slot, self.window_size
        for i in range(self.next, self.next + n):
            pwrite(fd, data, (i % window) * slot)
        self.next += n

    fill = churn


class PythonLoop(Churner):
    """with open(p, "wb") as f: f.write(data); os.unlink(the oldest)."""

    def fill(self, n):
        folder, data = str(self.folder), self.data
        for i in range(self.next, self.next + n):
            with open(f"{folder}/{i}.page", "wb") as f:
                f.write(data)
        self.next += n

    def churn(self, n):
        folder, data, window, unlink = str(self.folder), self.data, self.window_size, os.unlink
        for i in range(self.next, self.next + n):
            with open(f"{folder}/{i}.page", "wb") as f:
                f.write(data)
            unlink(f"{folder}/{i - window}.page")
        self.next += n


class Diskcache(Churner):
    """diskcache.Cache: set(i, data), delete(i - window). Values under 32 KiB live in its
    SQLite file, larger ones in files of their own; size_limit is raised so it never culls."""

    def open(self, folder):
        import diskcache

        super().open(folder)
        self.cache = diskcache.Cache(str(folder), size_limit=2**50)

    def fill(self, n):
        cache_set, data = self.cache.set, self.data
        for i in range(self.next, self.next + n):
            cache_set(i, data)
        self.next += n

    def churn(self, n):
        cache_set, delete, data, window = self.cache.set, self.cache.delete, self.data, self.window_size
        for i in range(self.next, self.next + n):
            cache_set(i, data)
            delete(i - window)
        self.next += n

    def close(self):
        self.cache.close()


class ZictFile(Churner):
    """zict.File: store[str(i)] = data, del store[str(i - window)] (a file per key)."""

    def open(self, folder):
        import zict

        super().open(folder)
        self.store = zict.File(str(folder))

    def fill(self, n):
        store, data = self.store, self.data
        for i in range(self.next, self.next + n):
            store[str(i)] = data
        self.next += n

    def churn(self, n):
        store, data, window = self.store, self.data, self.window_size
        for i in range(self.next, self.next + n):
            store[str(i)] = data
            del store[str(i - window)]
        self.next += n


# -- the harness's runner --------------------------------------------------------------------


class ChurnContender:
    """Fresh: a new folder every round, the window filled in setup (untimed) and everything
    removed in finish (untimed). Steady: one folder for the whole group, seasoned by the
    trace pass; the window carries over from round to round."""

    def __init__(self, label, make, disk: diskstate.Disk, steady: bool, steps: int):
        self.label, self.make, self.disk, self.steady = label, make, disk, steady
        self.per_round = steps
        self.slug = "".join(c if c.isalnum() else "-" for c in label)
        self.churner: Churner | None = None
        self.folder: Path | None = None
        self.end_bytes: list[int] = []
        self.trace_series: list[tuple[float, int, int, int, int]] = []

    def open(self, label_suffix=""):
        # a new part of the disk every fresh round (its own deletions would saturate a
        # shared one: diskstate.Disk); steady: under the shared steady parent
        self.folder = self.disk.folder(self.slug + label_suffix, own_group=True)
        self.churner = self.make()
        self.churner.open(self.folder)

    def close(self):
        if self.churner is not None:
            self.churner.close()
            self.churner = None
        if self.folder is not None:
            diskstate.remove_tree(self.folder)
            self.folder = None

    def trace(self) -> None:
        """Fill the window and churn SEASON steps from an empty folder, sampling the bytes
        on disk every few steps; the sampling's own time is left out of the time axis.
        Steady: this is the seasoning of the folder the rounds then use."""
        self.open("-trace" if not self.steady else "")
        churner, window = self.churner, self.churner.window_size
        total = window + SEASON
        every = max(1, total // SAMPLES)
        work = 0.0
        series = [(0.0, 0, *bytes_on_disk(self.folder))]
        done = 0
        while done < total:
            k = min(every, total - done)
            filling = min(k, max(0, window - done))
            t0 = time.perf_counter()
            if filling:
                churner.fill(filling)
            if k > filling:
                churner.churn(k - filling)
            work += time.perf_counter() - t0
            done += k
            series.append((work, done, *bytes_on_disk(self.folder)))
        self.trace_series = series
        if not self.steady:
            self.close()

    # harness protocol
    def setup(self):
        if self.steady:
            return
        self.open()
        self.churner.fill(self.churner.window_size)

    def run(self):
        self.churner.churn(self.per_round)

    def finish(self, measured):
        if measured:
            self.end_bytes.append(bytes_on_disk(self.folder)[0])
        if not self.steady:
            self.close()

    def drop(self):
        pass  # the window is the workload's state: nothing of an earlier round to drop

    def cleanup(self):
        self.close()


def contenders(floor, data, size, disk, steady) -> tuple[dict[str, ChurnContender], dict[str, str]]:
    makers = {
        "diskpages": lambda: Diskpages(data, WINDOW),
        "diskpages pack_max=0": lambda: Diskpages(data, WINDOW, pack_max=0),
    }
    if size == "4KiB" and not steady:
        makers["diskpages write_many()"] = lambda: Diskpages(data, WINDOW, many=True)
    makers[BASELINE] = lambda: FloorFiles(data, WINDOW, floor)
    makers["C floor: slots in one file"] = lambda: FloorSlots(data, WINDOW, floor)
    makers[PYTHON_SLOTS] = lambda: PythonSlots(data, WINDOW)
    makers["python loop"] = lambda: PythonLoop(data, WINDOW)
    missing = {}
    for peer, cls in (("diskcache", Diskcache), ("zict.File", ZictFile)):
        why = peers.missing_reason(peer)
        if why is None and peer == "diskcache" and size not in DISKCACHE_SIZES:
            why = "quick run: diskcache churns 4 KiB pages only (its SQLite fsyncs its checkpoints)"
        if why is None:
            makers[peer] = lambda cls=cls: cls(data, WINDOW)
        else:
            missing[peer] = why
    steps = {label: DISKCACHE_STEPS[size] if label == "diskcache" else STEPS[size] for label in makers}
    runners = {
        label: ChurnContender(label, make, disk, steady, steps[label]) for label, make in makers.items()
    }
    return runners, missing


def skip_reason(size=None, state=None, **_) -> str | None:
    if SMOKE and size != "4KiB":
        return "smoke run: 4 KiB pages only"
    return None


@pytest.mark.parametrize("size", list(SIZES))
def test_small_churn(benchmark, floor, disk, state, fs, size):
    steady = state == "steady"
    data = os.urandom(SIZES[size])
    runners, missing = contenders(floor, data, size, disk, steady)
    try:
        for runner in runners.values():
            runner.trace()
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    record(
        benchmark,
        f"small churn {size}, window {WINDOW}, {state} on {fs.label}",
        runners,
        STEPS[size],
        BASELINE,
        ROUNDS,
        warmup=disk.warmup,
        before_round=disk.before_round,
        kind="small_churn",
        unit="step (one page written, the oldest dropped)",
        size=SIZES[size],
        size_label=size,
        state=state,
        fs=fs.name,
        fs_info=fs.info,
        window=WINDOW,
        steps=STEPS[size],
        diskcache_steps=DISKCACHE_STEPS[size],
        season_steps=SEASON,
        write_many_batch=WRITE_MANY,
        pack_max_supported=PACK_MAX,
        missing_peers=missing,
    )
    benchmark.extra_info["traces"] = {label: r.trace_series for label, r in runners.items()}
    benchmark.extra_info["end_bytes"] = {
        label: sorted(r.end_bytes)[len(r.end_bytes) // 2] if r.end_bytes else None
        for label, r in runners.items()
    }
    benchmark.extra_info["live_bytes"] = WINDOW * SIZES[size]
