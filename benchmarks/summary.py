"""Print the interleaved groups of a pytest-benchmark JSON file as Markdown tables.

python -m pytest benchmarks --benchmark-json=bench.json
python benchmarks/summary.py bench.json
"""

from __future__ import annotations

import json
import sys


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def main(path: str) -> None:
    data = json.load(open(path))
    info = data.get("machine_info", {})
    print(
        f"Run {data.get('datetime', '?')} on {info.get('node', '?')} "
        f"({info.get('cpu', {}).get('brand_raw', '?')}), Python {info.get('python_version', '?')}\n"
    )
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        stats = extra.get("contenders")
        if "p99_s" in extra:
            print(f"### {extra['group']}\n")
            print(
                f"max_delay {fmt_time(extra['max_delay_s'])}: median {fmt_time(extra['median_s'])}, "
                f"p99 {fmt_time(extra['p99_s'])}, max {fmt_time(extra['max_s'])} "
                f"over {extra['samples']} pages\n"
            )
        if not stats:
            continue
        unit = extra.get("unit", "op")
        base = extra["baseline"]
        print(f"### {extra['group']}\n")
        print(f"| contender | median per {unit} | IQR | ratio to {base} (median of rounds) | rounds |")
        print("|---|---:|---:|---:|---:|")
        for name, s in stats.items():
            print(
                f"| {name} | {fmt_time(s['median_s'])} | {fmt_time(s['iqr_s'])} | "
                f"{s['ratio']:.2f} ± {s['ratio_iqr'] / 2:.2f} | {s['rounds']} |"
            )
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
