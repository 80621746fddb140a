"""The dask tables of a run: report.py puts them in REPORT.md's dask section; run alone, it
prints them for a run of test_dask_spill.py and test_dask_memory.py only.

python -m pytest benchmarks/test_dask_spill.py --benchmark-json=bench-dask.json
python -m pytest benchmarks/test_dask_memory.py --benchmark-json=bench-memory.json
python benchmarks/dask_report.py bench-dask.json [more.json]   # prints Markdown

Every ratio is ours over distributed's SpillBuffer: the median over rounds of the two
times in the same round, ± half its interquartile range (report_format.pair_ratio), so below 1
is faster than distributed's. The figures themselves are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from report_format import FS_LABEL, FS_ORDER, fmt_ratio, fmt_time, groups_of, pair_ratio, table

BASELINE, OURS, OURS_FILES, FLOOR = "distributed", "diskpages", "diskpages pack_max=0", "dict store (floor)"
SIZES = ["64KiB", "1MiB", "10MiB"]


def ordered(groups: list[dict], *keys: str) -> list[dict]:
    def key(g):
        e = g["extra_info"]
        fs = FS_ORDER.index(e["fs"]) if e.get("fs") in FS_ORDER else len(FS_ORDER)
        size = SIZES.index(e["size_label"]) if e.get("size_label") in SIZES else -1
        return (size, *(str(e.get(k)) for k in keys), fs)

    return sorted(groups, key=key)


def per_key(g: dict, name: str) -> str:
    return fmt_time(g["extra_info"]["contenders"][name]["median_s"])


def contender_cells(g: dict) -> list[str]:
    """distributed's time, ours and its ratio, ours with pack_max=0 and its ratio."""
    cells = [per_key(g, BASELINE)]
    for name in (OURS, OURS_FILES):
        cells += [per_key(g, name), fmt_ratio(pair_ratio(g, name, BASELINE))]
    return cells


def spill_tables(data: dict, out: list[str]) -> None:
    for kind, title, keys in (
        ("dask_spill", "Spill: `buf[key] = value` (target=1), per key", ("state",)),
        ("dask_unspill", "Unspill: `buf[key]` of a spilled key, per key", ("mode",)),
    ):
        groups = ordered(groups_of(data, kind), *keys)
        if not groups:
            continue
        out.append(f"\n### {title}\n\n")
        head = ["size", keys[0], "file system", "distributed", "diskpages", "÷ distributed"]
        head += ["pack_max=0", "÷ distributed", "floor ÷ distributed"]
        rows = []
        for g in groups:
            e = g["extra_info"]
            rows.append(
                [
                    e["size_label"],
                    e[keys[0]],
                    FS_LABEL.get(e["fs"], e["fs"]),
                    *contender_cells(g),
                    fmt_ratio(pair_ratio(g, FLOOR, BASELINE)),
                ]
            )
        out.append(table(head, rows, "lll" + "r" * 6))


def delete_table(data: dict, out: list[str]) -> None:
    groups = ordered(groups_of(data, "dask_delete"), "data")
    if not groups:
        return
    keys = groups[0]["extra_info"]["keys"]
    out.append(f"\n### Delete {keys} spilled keys of 64 KiB: the caller's time, per key\n\n")
    head = ["data", "file system", "distributed", "diskpages", "÷ distributed", "pack_max=0"]
    head += ["÷ distributed", "floor", "until gone: distributed", "diskpages", "pack_max=0"]
    rows = []
    for g in groups:
        e = g["extra_info"]
        gone = e.get("gone", {})
        rows.append(
            [
                e["data"],
                FS_LABEL.get(e["fs"], e["fs"]),
                *contender_cells(g),
                per_key(g, FLOOR),
                *(fmt_time(gone.get(n, {}).get("median_s")) for n in (BASELINE, OURS, OURS_FILES)),
            ]
        )
    out.append(table(head, rows, "ll" + "r" * 9))
    out.append(
        "\n*until gone*: from the first `del` until the bytes are gone, all keys (diskpages: "
        "until `stats().pending == 0`; distributed: the end of its loop).\n"
    )


def cluster_table(data: dict, out: list[str]) -> None:
    groups = groups_of(data, "dask_cluster")
    if not groups:
        return
    e0 = groups[0]["extra_info"]
    out.append(
        f"\n### LocalCluster: {e0['workers']} workers ({'processes' if e0['processes'] else 'threads'}), "
        f"{e0['total_bytes'] >> 20} MiB in chunks of {e0['chunk'] >> 10} KiB, target "
        f"{e0['target_per_worker'] >> 20} MiB per worker\n\n"
    )
    head = ["spill", "", "wall", "release", "loop max (all)", "loop max (release)", "lateness sum (release)"]
    head += ["stalls ≥10 ms", "spilled keys", "store write per key", "store read per key"]
    rows = []
    for g in groups:
        e = g["extra_info"]
        loop = e["loop"]
        for name in (BASELINE, OURS):
            s, c = loop[name], e["contenders"][name]
            rows.append(
                [
                    e["spill"],
                    name,
                    fmt_time(c["median_s"]),
                    fmt_time(s["release_s"]),
                    fmt_time(s["loop_max_s"]),
                    fmt_time(s["loop_max_release_s"]),
                    fmt_time(s["loop_late_sum_release_s"]),
                    f"{s['loop_stalls_10ms']:.0f}",
                    f"{s['spilled']:.0f}",
                    per_op(loop[name]["rounds"], "write_s", "spilled"),
                    per_op(loop[name]["rounds"], "read_s", "unspilled"),
                ]
            )
        ours = loop[OURS]

        def ratio(key, ours=ours):
            value = ours.get(f"{key}_over_{BASELINE}")
            return "–" if value is None else f"{value:.2f}"

        rows.append(
            [
                e["spill"],
                "**÷ distributed**",
                fmt_ratio(pair_ratio(g, OURS, BASELINE)),
                ratio("release_s"),
                ratio("loop_max_s"),
                ratio("loop_max_release_s"),
                ratio("loop_late_sum_release_s"),
                "",
                "",
                "",
                "",
            ]
        )
    out.append(table(head, rows, "ll" + "r" * 9))
    rounds = statistics.median(g["extra_info"]["contenders"][BASELINE]["rounds"] for g in groups)
    out.append(
        f"\nMedians over {rounds:.0f} rounds; a ratio row is the median of per-round ratios. "
        "*loop max*: the longest lateness of a 2 ms sleep on any worker's event loop. *store "
        "write/read per key*: distributed's own spill metrics (disk-write and disk-read seconds "
        "over their counts), summed over the workers.\n"
    )


def memory_table(data: dict, out: list[str]) -> None:
    """test_dask_memory.py: wall time, "Pausing worker" warnings, peak RSS and peak spill
    disk of the same job on distributed's buffer and on ours."""
    for g in groups_of(data, "dask_memory"):
        e = g["extra_info"]
        out.append(
            f"\n### Memory parity: (x + x.T).sum(0), {e['total_bytes'] / 1e9:.2g} GB in {e['chunks']:,} "
            f"chunks of {e['chunk_bytes'] / 1e3:.0f} KB, {e['workers']} workers "
            f"({'processes' if e['processes'] else 'threads'}) of {e['memory_limit'] / 1e6:.0f} MB\n\n"
        )
        head = ["", "wall", "pauses a run", "pauses in all", "peak RSS", "peak spill disk"]
        layout = "disk_per_spilled" in e["memory"][OURS]  # runs from before it: not shown
        if layout:
            head += ["peak spilled", "disk ÷ spilled"]
        rows = []
        memory = e["memory"]
        for name in (BASELINE, OURS):
            m = memory[name]
            rows.append(
                [
                    name,
                    fmt_time(e["contenders"][name]["median_s"]),
                    ", ".join(str(r["pauses"]) for r in m["rounds"]),
                    f"{m['pauses_total']}",
                    f"{m['peak_rss'] / 1e6:.0f} MB",
                    f"{m['peak_spill_disk'] / 1e6:.0f} MB",
                ]
                + (
                    [
                        f"{m['peak_spilled'] / 1e6:.0f} MB",
                        f"{m['disk_per_spilled']:.3f}" if m["disk_per_spilled"] else "–",
                    ]
                    if layout
                    else []
                )
            )
        base, ours = memory[BASELINE], memory[OURS]

        def over(key: str, base: dict = base, ours: dict = ours) -> str:
            return f"{ours[key] / base[key]:.2f}" if base[key] else "–"

        rows.append(
            [
                "**÷ distributed**",
                fmt_ratio(pair_ratio(g, OURS, BASELINE)),
                "",
                "",
                over("peak_rss"),
                over("peak_spill_disk"),
            ]
            + ([over("peak_spilled"), over("disk_per_spilled")] if layout else [])
        )
        out.append(table(head, rows, "l" + "r" * (len(head) - 1)))
        restarted = {name: sum(r.get("restarted", 0) for r in memory[name]["rounds"]) for name in memory}
        if any(restarted.values()):
            out.append(
                "\n**Workers restarted by their nanny during the runs** (a crash, or memory past "
                f"the terminate threshold): {restarted}.\n"
            )
        out.append(
            f"\nMedians over {len(base['rounds'])} rounds (a new cluster each), alternating; "
            '*pauses*: the workers\' "Pausing worker" warnings (RSS over 0.8 of the limit), per '
            "round in order; *peak RSS*: of either worker, sampled every 10 ms; *peak spill "
            "disk*: st_blocks under the workers' folders, every 100 ms"
            + (
                "; *peak spilled*: the peak of what each buffer counted as spilled "
                "(serialized bytes, every 10 ms, inside the worker), summed over the workers; "
                "*disk ÷ spilled*: each worker folder's peak over it, the store's layout (and "
                "what it keeps of freed values) apart from how much each buffer spilled"
                if layout
                else ""
            )
            + ".\n"
        )


def per_op(rounds: list[dict], seconds: str, count: str) -> str:
    """The median over rounds of ``seconds`` per ``count`` (runs from before these were
    recorded: –)."""
    xs = [r[seconds] / r[count] for r in rounds if r.get(count) and seconds in r]
    return fmt_time(statistics.median(xs)) if xs else "–"


def render(runs: list[dict]) -> str:
    """The tables of one run, or of several (e.g. a full run and a rerun of one group): a
    group is taken from the last run that has it."""
    out = []
    for data in runs:
        info = data.get("machine_info", {}).get("diskpages_bench", {})
        out.append(
            f"Run: `{info.get('command', '?')}` ({info.get('mode', '?')} mode, {info.get('rounds', '?')} "
            f"rounds, finished {info.get('finished', '?')}, commit {info.get('git_commit', '?')}"
            f"{' dirty' if info.get('git_dirty') else ''}, {info.get('elapsed_s', 0):.0f} s)\n\n"
        )
    groups: dict[str, dict] = {}
    for data in runs:
        groups.update({b["extra_info"].get("group", b["name"]): b for b in data["benchmarks"]})
    data = {"benchmarks": list(groups.values())}
    spill_tables(data, out)
    delete_table(data, out)
    cluster_table(data, out)
    memory_table(data, out)
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json); later ones win")
    args = parser.parse_args(argv)
    sys.stdout.write(render([json.loads(Path(p).read_text()) for p in args.json]))


if __name__ == "__main__":
    main(sys.argv[1:])
