"""The disk budget against the cycle collector.

cycles: N pages of 64 KiB, each dropped inside a reference cycle (so only the cycle
collector frees it), written (a) with gc at its default thresholds, (b) with gc disabled
(the disk fills until the final collection), (c) with gc disabled and max_bytes set to a
tenth of the data, so the writes themselves make the collector run. Per arm: wall time
(interleaved rounds; ratio to (a)) and the peak bytes of live and pending pages, sampled
after every write from stats() (the files on disk: a page's bytes count until its file is
removed).

budget check: 4 KiB writes into a cache with max_bytes=None against one with a budget that
is never reached: what the reservation costs per write.
"""

from __future__ import annotations

import gc

from diskpages import PageCache

from conftest import ROUNDS, scaled
from harness import record

PAGE = 64 << 10
N = scaled(1600, 400, 20)


class CyclicArm:
    def __init__(self, root, gc_on, budget):
        self.root, self.gc_on, self.budget = root, gc_on, budget
        self.peaks: list[int] = []
        self.per_round = N

    def setup(self):
        gc.collect()
        self.cache = PageCache(self.root, max_bytes=self.budget, max_delay=0.01)

    def run(self):
        was = gc.isenabled()
        (gc.enable if self.gc_on else gc.disable)()
        cache, data, peak = self.cache, b"p" * PAGE, 0
        try:
            for _ in range(N):
                a = [cache.write(data)]
                a.append(a)
                s = cache.stats()
                peak = max(peak, s.live_bytes + s.pending_bytes)
            del a
        finally:
            (gc.enable if was else gc.disable)()
        self.peaks.append(peak)
        gc.collect()  # what (b) must do in the end anyway; inside the timed run for all
        cache.close()

    def cleanup(self):
        pass


def test_cyclic_pages_peak_bytes_and_time(benchmark, bench_root):
    total = N * PAGE
    arms = {
        "gc default thresholds": CyclicArm(bench_root, True, None),
        "gc disabled": CyclicArm(bench_root, False, None),
        "gc disabled, max_bytes = 1/10 of data": CyclicArm(bench_root, False, total // 10),
    }
    stats = record(
        benchmark,
        f"cycles: {N} pages of 64 KiB dropped in cycles",
        arms,
        N,
        "gc default thresholds",
        min(ROUNDS, 5),
        unit="page",
    )
    peaks = {name: max(arm.peaks) for name, arm in arms.items()}
    benchmark.extra_info["peak_bytes"] = peaks
    benchmark.extra_info["data_bytes"] = total
    for name in arms:
        stats[name]["peak_bytes"] = peaks[name]
    assert peaks["gc disabled, max_bytes = 1/10 of data"] <= total // 10


class Writes:
    def __init__(self, root, budget, n):
        self.cache = PageCache(root, max_bytes=budget, max_delay=3600, batch=2**31 - 1)
        self.per_round = n

    def setup(self):
        self.cache.remove_released()

    def run(self):
        w, data = self.cache.write, b"w" * 4096
        for _ in range(self.per_round):
            w(data).release()

    def cleanup(self):
        self.cache.close()


def test_budget_check_cost_per_write(benchmark, bench_root):
    # Both caches under one ordinary parent folder, so ext4 puts both cache folders in
    # its block group: the session root spreads its subfolders over the disk, and one
    # cache landing among recently deleted inodes made creates there 2x slower.
    parent = bench_root / "budget-check"
    parent.mkdir(mode=0o700)
    n = 400
    runners = {
        "max_bytes=None": Writes(parent, None, n),
        "max_bytes=1 TiB (never reached)": Writes(parent, 1 << 40, n),
    }
    group = "budget check: 4 KiB write + release"
    record(benchmark, group, runners, n, "max_bytes=None", ROUNDS, unit="page")
