"""Interleaved rounds: the way to compare contenders on a disk whose speed drifts.

On this machine the same round of file creates can take 30 ms or 65 ms depending on what
the file system did just before (deletions with `discard`, background writeback), so
running contender A's rounds and then B's compares the disk's moods, not A and B. Here
every round runs each contender once, in an order that rotates from round to round, and
the figure reported for a contender is the median of its per-round ratio to the baseline
in the same round.

pytest-benchmark runs and records the suite: each group is one benchmark whose
``extra_info["contenders"]`` holds the per-contender statistics and the raw per-round
times, from which benchmarks/report.py computes a ratio between any two contenders.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Protocol


class Runner(Protocol):
    def setup(self) -> None: ...  # untimed: prepare one round
    def run(self) -> None: ...  # timed: one round of `per_round` operations
    def cleanup(self) -> None: ...  # once, after all rounds

    # optional: finish(), untimed, right after each run (e.g. to wait for and observe what
    # the round left behind); drop(), for a before_round hook such as diskstate's


DEFAULT_WARMUP = 1  # rounds run and thrown away first; conftest.py sets 0 for smoke runs


def interleave(
    runners: dict[str, Runner],
    rounds: int,
    warmup: int = 1,
    before_round: Callable[[dict[str, Runner]], None] | None = None,
) -> dict[str, list[float]]:
    """Per contender, the time of each round after ``warmup`` rounds. ``before_round``
    (untimed) runs before every round, e.g. to bring the disk to the same state for all."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(warmup + rounds):
            if before_round is not None:
                before_round(runners)
            k = r % len(names)
            for name in names[k:] + names[:k]:
                runner = runners[name]
                runner.setup()
                t0 = time.perf_counter()
                runner.run()
                elapsed = time.perf_counter() - t0
                if hasattr(runner, "finish"):
                    runner.finish(measured=r >= warmup)
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
    """Per contender: median and IQR of time per operation, the median of the per-round
    ratio (per operation) to the baseline with its IQR, and the raw round times."""
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
            "times_s": xs,
        }
    return out


def record(
    benchmark,
    group: str,
    runners: dict[str, Runner],
    per_round: int,
    baseline: str,
    rounds: int,
    warmup: int | None = None,
    before_round: Callable[[dict[str, Runner]], None] | None = None,
    **info,
) -> dict[str, dict]:
    """Run the interleaved rounds under pytest-benchmark and attach the statistics.
    A runner with a ``per_round`` attribute does that many operations a round instead."""
    holder: dict[str, dict[str, list[float]]] = {}

    def go():
        holder["times"] = interleave(
            runners, rounds, DEFAULT_WARMUP if warmup is None else warmup, before_round
        )

    benchmark.group = group
    benchmark.pedantic(go, rounds=1, iterations=1)
    counts = {name: getattr(r, "per_round", per_round) for name, r in runners.items()}
    stats = summarize(holder["times"], counts, baseline)
    benchmark.extra_info.update(group=group, baseline=baseline, contenders=stats, **info)
    return stats
