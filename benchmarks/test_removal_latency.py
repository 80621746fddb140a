"""How long after the last reference goes is a page's file gone, with no call at all?

The promise is max_delay (plus the time to remove one batch). A single page is dropped,
then the file is polled with os.stat until it is gone; repeated, with a pause between
drops so each one meets the reaper at a different point of its tick. The figures are
reported against max_delay itself, which is the baseline here.
"""

from __future__ import annotations

import os
import statistics
import time

from diskpages import PageCache

from conftest import scaled

MAX_DELAY = 0.05
SAMPLES = scaled(150, 40, 3)


def test_removal_latency_without_any_call(benchmark, bench_root):
    latencies: list[float] = []

    def measure():
        # pack_max=0: a file per page, whose going is what is timed (a packed page's slot
        # is freed inside a shared segment file, with no name to watch)
        with PageCache(bench_root, max_delay=MAX_DELAY, pack_max=0) as cache:
            keep = cache.write(b"k")  # a live page keeps the reaper ticking, as in real use
            for i in range(SAMPLES):
                page = cache.write(b"x" * 4096)
                path = str(page.path)
                t0 = time.perf_counter()
                del page
                while os.path.exists(path):
                    time.sleep(0.0002)
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.003 * (i % 7))
            del keep

    benchmark.group = "removal latency without any call"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    med = statistics.median(latencies)
    benchmark.extra_info.update(
        group="removal latency without any call",
        kind="latency",
        max_delay_s=MAX_DELAY,
        median_s=med,
        p99_s=p99,
        max_s=latencies[-1],
        samples=len(latencies),
        median_over_max_delay=med / MAX_DELAY,
        p99_over_max_delay=p99 / MAX_DELAY,
    )
