"""Interleaved rounds: the way to compare contenders on a disk whose speed drifts.

On this machine the same round of file creates can take 30 ms or 65 ms depending on what
the file system did just before (deletions with `discard`, background writeback), so
running contender A's rounds and then B's compares the disk's moods, not A and B. Here
every round runs each contender once, in an order that rotates from round to round, and
the figure reported for a contender is the median of its per-round ratio to the baseline
in the same round.

pytest-benchmark runs and records the suite: each group is one benchmark whose
``extra_info["contenders"]`` holds the per-contender statistics that summary.py prints.
"""

from __future__ import annotations

import statistics
import time
from typing import Protocol


class Runner(Protocol):
    def setup(self) -> None: ...  # untimed: prepare one round
    def run(self) -> None: ...  # timed: one round of `per_round` operations
    def cleanup(self) -> None: ...  # once, after all rounds


def interleave(runners: dict[str, Runner], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(warmup + rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                runner = runners[name]
                runner.setup()
                t0 = time.perf_counter()
                runner.run()
                elapsed = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(elapsed)
    finally:
        for runner in runners.values():
            runner.cleanup()
    return times


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize(times: dict[str, list[float]], per_round: dict[str, int], baseline: str) -> dict[str, dict]:
    """Per contender: median and IQR of time per operation, and the median of the
    per-round ratio (per operation) to the baseline, with its IQR."""
    out = {}
    base = [t / per_round[baseline] for t in times[baseline]]
    for name, xs in times.items():
        per_op = [x / per_round[name] for x in xs]
        q1, med, q3 = quartiles(per_op)
        r1, rmed, r3 = quartiles([x / b for x, b in zip(per_op, base, strict=True)])
        out[name] = {
            "median_s": med,
            "iqr_s": q3 - q1,
            "ratio": rmed,
            "ratio_iqr": r3 - r1,
            "rounds": len(xs),
            "per_round": per_round[name],
        }
    return out


def record(
    benchmark, group: str, runners: dict[str, Runner], per_round: int, baseline: str, rounds: int, **info
) -> dict[str, dict]:
    """Run the interleaved rounds under pytest-benchmark and attach the statistics.
    A runner with a ``per_round`` attribute does that many operations a round instead."""
    holder: dict[str, dict[str, list[float]]] = {}

    def go():
        holder["times"] = interleave(runners, rounds)

    benchmark.group = group
    benchmark.pedantic(go, rounds=1, iterations=1)
    counts = {name: getattr(r, "per_round", per_round) for name, r in runners.items()}
    stats = summarize(holder["times"], counts, baseline)
    benchmark.extra_info.update(group=group, baseline=baseline, contenders=stats, **info)
    return stats
