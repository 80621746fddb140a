"""Two builds of diskpages, side by side: the per-page time of write() then drop, of a
4 KiB packed page, of write_many() of 1,000, of dropping a page (a list of pages
cleared), and of gc.collect() with the pages pending in cycles of their own (against the
same cycles holding None), in interleaved rounds (see harness.py for why), each build in
a process of its own.

    python benchmarks/ab_builds.py BEFORE_SRC AFTER_SRC [--rounds 15] [--pages 20000]

BEFORE_SRC and AFTER_SRC are ``src`` folders with the extension built in place (``python
csrc/build_ffi.py`` in each checkout). Prints, for each operation, the median per-page
time of each build and the median of the per-round ratio after/before (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import gc, json, sys, time, tempfile
    from diskpages import PageCache
    root = tempfile.TemporaryDirectory(prefix="ab-")
    cache = PageCache(root.name, max_delay=0.01)
    data = b"x" * 4096
    n = int(sys.argv[1])
    write = cache.write
    class Holder:
        __slots__ = ("page", "me")

    def make_cycles(objs):
        for obj in objs:
            holder = Holder()
            holder.page, holder.me = obj, holder

    def pending_cycles(objs):
        make_cycles(objs)
        del objs[:]
        t = time.perf_counter()
        gc.collect()  # the cycles made above (the round began with a collection)
        return time.perf_counter() - t

    gc.disable()
    for line in sys.stdin:
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(n):
            write(data)
        t1 = time.perf_counter()
        pages = [write(data) for _ in range(n)]
        t2 = time.perf_counter()
        pages.clear()
        t3 = time.perf_counter()
        for _ in range(n // 1000):
            cache.write_many([data] * 1000)
        t4 = time.perf_counter()
        cache.remove_released()
        gc.collect()
        gc_none = pending_cycles([None] * n)
        gc_pages = pending_cycles(cache.write_many([data] * n))
        cache.remove_released()
        print(json.dumps({
            "write and drop": (t1 - t0) / n,
            "drop": (t3 - t2) / n,
            "write_many": (t4 - t3) / (n // 1000 * 1000),
            "gc pause": gc_pages / n,
            "gc pause, None": gc_none / n,
        }), flush=True)
    cache.close()
    root.cleanup()
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pages", type=int, default=20000)
    args = parser.parse_args()
    builds = {"before": args.before, "after": args.after}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", CHILD, str(args.pages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
        )
        for name, path in builds.items()
    }
    times: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    names = list(builds)
    for r in range(args.rounds + 1):  # the first round warms up
        for name in names[r % 2 :] + names[: r % 2]:
            proc = procs[name]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            if r:
                times[name].append(result)
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(60)
    for op in times["before"][0]:
        before = [t[op] for t in times["before"]]
        after = [t[op] for t in times["after"]]
        ratio = statistics.median(a / b for a, b in zip(after, before, strict=True))
        print(
            f"{op:>15}: before {statistics.median(before) * 1e9:7.0f} ns, "
            f"after {statistics.median(after) * 1e9:7.0f} ns a page, after/before {ratio:.3f}"
        )
    for name in names:  # the collector's price for pages, in each build's own rounds
        pause = statistics.median(t["gc pause"] / t["gc pause, None"] for t in times[name])
        print(f"{name:>6}: gc pause with pages / with None {pause:.2f}")


if __name__ == "__main__":
    main()
