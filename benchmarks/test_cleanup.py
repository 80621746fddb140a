"""Cleanup: refcount against cycle collection, the question this suite exists to answer.

Workload: each iteration writes a 64 KiB page and hands it to a small holder object; the
last WINDOW holders stay referenced (work in progress), and the oldest is dropped. The
four ways the page can go:

- refcount: the holder is a plain object; dropping it drops the page.
- cycles, gc automatic: the holder refers to itself, so only the cycle collector frees it;
  gc runs at its default thresholds.
- cycles, gc off + collect() every K: the same cycles, gc disabled, and the program calls
  ``cache.collect()`` (gc.collect + remove_released) every K pages.
- release(): holders in cycles, and the program calls ``page.release()`` when it drops one.

Each runs with diskpages (default batch and max_delay) and with the naive design of the
seed notebook (a class whose ``__del__`` unlinks its own file; ``close()`` is its explicit
form, ``gc.collect()`` its collect()). A C thread reads inotify events of the folder
(floor.Watcher), so the time from dropping the last reference to the file being gone is
measured for every page, and the number of pages on disk at every moment is known. A page
not gone by SETTLE after the loop ended counts as "not gone" (its latency is above the
round's length). gc.callbacks record every automatic collection (generation and pause);
the loop's own collect() calls are timed whole, removal included.

Churn (``test_churn``): the same, with a window of 0: each iteration makes a page in a
cycle and drops it, so the program's live data never grows; what gc does and how many
pages pile up on disk is measured, with and without a disk budget (``max_bytes``).

Both run on this disk, a journaled ext4 and a tmpfs (``fs``: filesystems.py).

gc pause (``test_gc_pause``): gc.collect() when N pages wait in cycles, against the
same number of plain objects in cycles, the naive design (unlinks inside the collection),
and ``cache.collect()`` (collect and remove in the caller's thread).
"""

from __future__ import annotations

import collections
import gc
import os
import time
from pathlib import Path

import pytest

from diskpages import PageCache

import diskstate
from conftest import QUICK, SMOKE, scaled
from floor import Watcher
from harness import record

PAGE = 64 << 10
WINDOW = 32
EVERY = 50  # K: pages between explicit collections
SETTLE = 0.02 if SMOKE else 0.15  # s after the loop: 3 max_delay, for the reaper's last batch
ROUNDS = scaled(6, 3, 1)
SERIES_POINTS = 400


class Holder:
    """The user's object that holds a page; ``me`` makes it a reference cycle."""

    __slots__ = ("page", "me")


class NaivePage:
    """The seed notebook's Table: one file per object, written in __init__ and unlinked in
    __del__, synchronously, in whatever code drops the last reference (or in the
    collector). ``close()`` is the explicit form (the notebook calls ``t.__del__()``)."""

    __slots__ = ("path", "id")

    def __init__(self, folder: str, page_id: int, data: bytes) -> None:
        path = f"{folder}/{page_id}.page"
        with open(path, "xb", buffering=0) as f:
            f.write(data)
        self.path, self.id = path, page_id

    def close(self) -> None:
        if self.path is not None:
            os.unlink(self.path)
            self.path = None

    def __del__(self) -> None:
        if self.path is not None:
            os.unlink(self.path)


def quantile(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, round(q * (len(sorted_xs) - 1)))]


class CleanupArm:
    """One design ("diskpages" or "naive") and one way of dropping pages, as a harness
    runner; it keeps what the watcher and gc saw in every measured round."""

    def __init__(self, design, drop, disk: diskstate.Disk, floor, n, window, max_bytes=None):
        self.design, self.drop_mode, self.disk, self.floor = design, drop, disk, floor
        self.per_round, self.window_size, self.max_bytes = n, window, max_bytes
        self.data = os.urandom(PAGE)
        self.label = f"{design}-{drop.split()[0].strip(',()')}"
        self.folder: Path | None = None
        self.cache = None
        self.watcher = None
        self.rounds: list[dict] = []
        self.series: list[tuple[float, int]] = []
        if max_bytes is not None:  # fail now, before any round, if there is no budget yet
            self.open_round()
            self.close_round()

    def drop(self):
        pass  # every round removes its own pages

    def open_round(self):
        """A new folder (and cache) every round: in fresh state each round starts in a part
        of the disk of its own, so no arm meets the deletions of the arm before it."""
        self.folder = self.disk.folder(self.label, own_group=True)
        if self.design == "diskpages":
            kwargs = {} if self.max_bytes is None else {"max_bytes": self.max_bytes}
            # pack_max=0: a file per page, as the naive design has, so inotify sees each
            # page go (a packed page is a slot in a shared segment file: no name to watch)
            self.cache = PageCache(self.folder, pack_max=0, **kwargs)  # TypeError if max_bytes is unknown

    def close_round(self):
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.folder is not None:
            diskstate.remove_tree(self.folder)
            self.folder = None

    # -- one round --------------------------------------------------------------------

    def setup(self):
        if not gc.isenabled():
            raise RuntimeError(
                "gc is disabled (--benchmark-disable-gc?): the automatic arms would mean nothing"
            )
        self.open_round()
        self.next_id = 0
        files_folder = self.cache.path if self.cache is not None else self.folder
        self.window: collections.deque = collections.deque()
        self.drops: list[tuple[int, int]] = []  # (page id, when its last reference went)
        self.gc_events: list[tuple[int, int, int]] = []  # automatic: (generation, start, stop)
        self.explicit: list[int] = []  # ns each collect() call of the loop took, flush included
        self.in_explicit = False
        self.watcher = Watcher(self.floor, files_folder, 2 * self.per_round + 64)
        self.gc_was_enabled = gc.isenabled()
        if self.drop_mode.startswith("cycles, gc off"):
            gc.disable()
        gc.callbacks.append(self.on_gc)
        self.t0 = time.perf_counter_ns()

    def on_gc(self, phase, info):
        if self.in_explicit:
            return  # counted whole, flush included, by collect_now()
        if phase == "start":
            self.gc_start = time.perf_counter_ns()
        else:
            self.gc_events.append((info["generation"], self.gc_start, time.perf_counter_ns()))

    def collect_now(self):
        """The loop's own collection every EVERY pages: cache.collect() (gc + remove_released), or
        gc.collect() for the naive design, whose __del__ unlinks inside it."""
        self.in_explicit = True
        t = time.perf_counter_ns()
        if self.cache is not None:
            self.cache.collect()
        else:
            gc.collect()
        self.explicit.append(time.perf_counter_ns() - t)
        self.in_explicit = False

    def run(self):
        if self.design == "diskpages":
            self.run_diskpages()
        else:
            self.run_naive()

    def run_diskpages(self):
        cache, data, window, drops = self.cache, self.data, self.window, self.drops
        size, mode, now = self.window_size, self.drop_mode, time.perf_counter_ns
        cyclic = mode != "refcount"
        release = mode == "release()"
        every = EVERY if mode.startswith("cycles, gc off") else 0
        for i in range(self.per_round):
            h = Holder()
            h.page = cache.write(data)
            if cyclic:
                h.me = h
            window.append(h)
            if len(window) > size:
                old = window.popleft()
                drops.append((old.page.id, now()))
                if release:
                    old.page.release()
                del old  # the last reference to the holder (and, by refcount, to the page)
            if every and i % every == every - 1:
                self.collect_now()

    def run_naive(self):
        data, window, drops, folder = self.data, self.window, self.drops, str(self.folder)
        size, mode, now = self.window_size, self.drop_mode, time.perf_counter_ns
        cyclic = mode != "refcount"
        close = mode == "close()"
        every = EVERY if mode.startswith("cycles, gc off") else 0
        start = self.next_id
        self.next_id += self.per_round
        for i in range(start, start + self.per_round):
            h = Holder()
            h.page = NaivePage(folder, i, data)
            if cyclic:
                h.me = h
            window.append(h)
            if len(window) > size:
                old = window.popleft()
                drops.append((old.page.id, now()))
                if close:
                    old.page.close()
                del old
            if every and (i - start) % every == every - 1:
                self.collect_now()

    def finish(self, measured: bool):
        t_end = time.perf_counter_ns()
        time.sleep(SETTLE)
        t_censor = time.perf_counter_ns()
        gc.callbacks.remove(self.on_gc)
        self.window.clear()
        if self.gc_was_enabled:
            gc.enable()
        gc.collect()
        if self.cache is not None:
            self.cache.remove_released()
        self.watcher_realtime = self.watcher.realtime
        events, overflowed = self.watcher.stop()
        self.watcher = None
        self.close_round()
        if measured:
            self.rounds.append(self.observe(events, overflowed, t_end, t_censor))

    def observe(self, events, overflowed, t_end, t_censor) -> dict:
        gone_at = {page_id: t for t, step, page_id in events if step < 0}
        latencies = []
        for page_id, t_drop in self.drops:
            gone = gone_at.get(page_id)
            latencies.append((gone - t_drop) / 1e9 if gone is not None and gone <= t_censor else float("inf"))
        on_disk, peak, series = 0, 0, []
        for t, step, _ in events:  # in the kernel's order (stamps are per read)
            if t > t_end:
                break
            on_disk += step
            peak = max(peak, on_disk)
            series.append(((t - self.t0) / 1e9, on_disk))
        gens = collections.Counter(g for g, _, _ in self.gc_events)
        pauses = [(stop - start) / 1e9 for _, start, stop in self.gc_events]
        self.series = thin(series, SERIES_POINTS)
        return {
            "latencies": latencies,
            "peak_pages": peak,
            "gc_runs": [gens.get(g, 0) for g in range(3)],
            "gc_pause_max_s": max(pauses, default=0.0),
            "gc_pause_total_s": sum(pauses),
            "collect_calls": len(self.explicit),
            "collect_max_s": max(self.explicit, default=0) / 1e9,
            "loop_s": (t_end - self.t0) / 1e9,
            "overflowed": overflowed,
            "watcher_realtime": self.watcher_realtime,
        }

    def cleanup(self):
        if self.watcher is not None:  # a round that raised
            self.watcher.stop()
            self.watcher = None
        self.window = collections.deque()
        gc.collect()
        self.close_round()

    def summary(self) -> dict:
        """Every measured round's figures pooled: what the report shows for this arm."""
        lat = sorted(x for r in self.rounds for x in r["latencies"])
        finite = [x for x in lat if x != float("inf")]
        rounds = max(1, len(self.rounds))

        def finite_or_none(x):  # None: more than that share of pages was not gone in time
            return None if x is None or x == float("inf") else x

        return {
            "pages_dropped": len(lat),
            "latency_median_s": finite_or_none(quantile(lat, 0.5) if lat else None),
            "latency_p99_s": finite_or_none(quantile(lat, 0.99) if lat else None),
            "latency_max_gone_s": finite[-1] if finite else None,
            "latency_median_gone_s": quantile(finite, 0.5) if finite else None,
            "not_gone_fraction": (len(lat) - len(finite)) / len(lat) if lat else 0.0,
            "peak_pages": max((r["peak_pages"] for r in self.rounds), default=0),
            "peak_bytes": max((r["peak_pages"] for r in self.rounds), default=0) * len(self.data),
            "gc_runs_per_round": [sum(r["gc_runs"][g] for r in self.rounds) / rounds for g in range(3)],
            "gc_pause_max_s": max((r["gc_pause_max_s"] for r in self.rounds), default=0.0),
            "collect_calls_per_round": sum(r["collect_calls"] for r in self.rounds) / rounds,
            "collect_max_s": max((r["collect_max_s"] for r in self.rounds), default=0.0),
            "loop_s_median": sorted(r["loop_s"] for r in self.rounds)[len(self.rounds) // 2]
            if self.rounds
            else None,
            "watcher_overflowed": any(r["overflowed"] for r in self.rounds),
            "watcher_realtime": all(r["watcher_realtime"] for r in self.rounds),
            "series": self.series,  # (s since the loop began, pages on disk), last round
        }


def thin(series: list[tuple[float, int]], points: int) -> list[tuple[float, int]]:
    """At most ``points`` samples of a step series, keeping each stretch's highest value so
    that peaks survive."""
    if len(series) <= points:
        return series
    step = len(series) / points
    out = []
    for k in range(points):
        chunk = series[int(k * step) : int((k + 1) * step)]
        if chunk:
            out.append(max(chunk, key=lambda p: p[1]))
    return out


ARMS = ["refcount", "cycles, gc automatic", f"cycles, gc off + collect() every {EVERY}", "release()"]
NAIVE_DROPS = {"release()": "close()", ARMS[2]: f"cycles, gc off + gc.collect() every {EVERY}"}


def run_arms(benchmark, group, arms: dict[str, CleanupArm], baseline, disk, fs, **info):
    gc_threshold = gc.get_threshold()
    record(
        benchmark,
        group,
        arms,
        arms[baseline].per_round,
        baseline,
        ROUNDS,
        warmup=disk.warmup,
        before_round=disk.before_round,
        kind="cleanup",
        fs=fs.name,
        fs_info=fs.info,
        unit="page",
        page_bytes=PAGE,
        gc_threshold=list(gc_threshold),
        gc_objects_at_start=len(gc.get_objects()),
        **info,
    )
    benchmark.extra_info["arms"] = {label: arm.summary() for label, arm in arms.items()}


def test_cleanup(benchmark, floor, disk, state, fs):
    n = scaled(1000, 300, 50) if state == "fresh" else scaled(200, 60, 30)
    arms = {}
    for mode in ARMS:
        arms[f"diskpages: {mode}"] = CleanupArm("diskpages", mode, disk, floor, n, WINDOW)
    for mode in ARMS:
        naive = NAIVE_DROPS.get(mode, mode)
        arms[f"naive __del__: {naive}"] = CleanupArm("naive", naive, disk, floor, n, WINDOW)
    run_arms(
        benchmark,
        f"cleanup: {n} pages of 64 KiB, window {WINDOW}, {state} on {fs.label}",
        arms,
        "diskpages: refcount",
        disk,
        fs,
        state=state,
        window=WINDOW,
        every=EVERY,
        settle_s=SETTLE,
    )


BUDGET_PAGES = 128


@pytest.mark.parametrize("budget", ["no budget", "max_bytes"])
def test_churn(benchmark, floor, disk, state, budget, fs):
    n = scaled(1500, 500, 50) if state == "fresh" else scaled(300, 60, 30)
    max_bytes = BUDGET_PAGES * PAGE if budget == "max_bytes" else None
    arms = {}
    try:
        for mode in ("refcount", "cycles, gc automatic"):
            arms[f"diskpages: {mode}"] = CleanupArm("diskpages", mode, disk, floor, n, 0, max_bytes)
    except TypeError as e:
        for arm in arms.values():
            arm.cleanup()
        pytest.skip(f"PageCache(max_bytes=...) is not there yet (TypeError: {e}); the budget arm needs it")
    if budget == "no budget":
        arms["naive __del__: cycles, gc automatic"] = CleanupArm(
            "naive", "cycles, gc automatic", disk, floor, n, 0
        )
    label = "no budget" if max_bytes is None else f"max_bytes={max_bytes >> 20} MiB"
    run_arms(
        benchmark,
        f"churn: {n} pages of 64 KiB made in cycles and dropped at once, {label}, {state} on {fs.label}",
        arms,
        "diskpages: refcount",
        disk,
        fs,
        state=state,
        window=0,
        budget_bytes=max_bytes,
    )


# -- gc pause ------------------------------------------------------------------------------


class PendingCycles:
    """N objects, each in its own reference cycle, made and dropped in setup (untimed); run()
    is the collection that frees them. The pages' files are still in the page cache, the
    cheap case for the naive design's unlinks (a written-back file costs ~0.1-1 ms more to
    unlink here: see test_removal_rate)."""

    def __init__(self, kind, disk: diskstate.Disk, n: int):
        self.kind, self.disk, self.per_round = kind, disk, n
        self.folder: Path | None = None
        self.cache = None

    def setup(self):
        gc.collect()
        data = b"p" * 4096
        if self.kind != "plain objects":  # a new folder a round: see CleanupArm.open_round
            self.folder = self.disk.folder(self.kind.split(":")[0].split()[0], own_group=True)
        if self.kind.startswith("diskpages"):
            self.cache = PageCache(self.folder)
            pages = self.cache.write_many([data] * self.per_round)
        elif self.kind.startswith("naive"):
            folder = str(self.folder)
            pages = [NaivePage(folder, i, data) for i in range(self.per_round)]
        else:
            pages = [None] * self.per_round
        for page in pages:
            h = Holder()
            h.page, h.me = page, h
        del pages, page, h

    def run(self):
        if self.kind == "diskpages: cache.collect()":
            self.cache.collect()
        else:
            gc.collect()

    def drop(self):
        pass  # nothing is left between rounds

    def finish(self, measured):
        self.cleanup()  # untimed: the next contender must not race the reaper

    def cleanup(self):
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.folder is not None:
            diskstate.remove_tree(self.folder)
            self.folder = None


PENDING = {
    "small": scaled(1000, 200, 20),
    "medium": scaled(10_000, 1000, 40),
    "large": scaled(100_000, 5000, 60),
}
STEADY_PENDING = scaled(500, 100, 20)


def skip_reason(state=None, pending=None, **_) -> str | None:
    """gc pause: fresh at three sizes; steady at one small size only: each create in the
    saturated group costs ~1 ms (diskstate.py), so 10,000 pending pages would take ~10 s to
    make per contender and round, while the collection itself makes no file."""
    if state == "steady" and pending not in (None, "small"):
        return "steady state: one small pending size only (each create there costs ~1 ms)"
    return None


@pytest.mark.parametrize("pending", list(PENDING))
def test_gc_pause(benchmark, disk, state, pending):
    n = STEADY_PENDING if state == "steady" else PENDING[pending]
    kinds = [
        "plain objects",
        "diskpages: gc.collect()",
        "diskpages: cache.collect()",
        "naive __del__: gc.collect()",
    ]
    runners = {kind: PendingCycles(kind, disk, n) for kind in kinds}
    rounds = 2 if pending == "large" and not QUICK else ROUNDS
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        record(
            benchmark,
            f"gc pause: {n} pending cycles, {state}",
            runners,
            n,
            "plain objects",
            rounds,
            warmup=0 if pending == "large" else None,
            before_round=disk.before_round,
            kind="gc_pause",
            unit="pending object",
            pending=n,
            state=state,
        )
    finally:
        if was_enabled:
            gc.enable()
