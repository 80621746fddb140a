"""Turn a benchmark run into REPORT.md and its plots, and print a short summary.

python -m pytest benchmarks --benchmark-json=bench.json --benchmark-quiet
python benchmarks/report.py bench.json            # or: --out some/folder

Only a full run of the whole suite writes benchmarks/results/, whose report and plots are
committed; any other run (DISKPAGES_QUICK=1, a smoke run, a part of the suite) writes
benchmarks/results/quick/, which git ignores. At the end it prints the headline ratios and
where the report is; the report holds every table.

Every figure is a median over interleaved rounds; a ratio is the median over rounds of
the contender's time divided by the other's in the same round, ± half its interquartile
range (harness.py). Plots (PNG, matplotlib's Agg backend) are written next to REPORT.md;
without matplotlib the report is written without them, and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Its rooms sit beside it. Run as a script, its folder is on sys.path already; loaded by
# its path (importlib, as tests/test_benchmarks_smoke.py does) it is not, so it is put there
# for these imports only: left there, benchmarks/conftest.py would shadow tests/conftest.py
# in that process and in every process it spawns.
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import dask_report
    from report_churn import churn_section
    from report_cleanup import cleanup_section
    from report_format import (
        FS_LABEL,
        PEERS,
        SPREAD_NOTE,
        filesystems_in,
        find,
        find_write,
        fmt_ratio,
        fmt_time,
        groups_of,
        pair_ratio,
        table,
    )
    from report_gc_pause import gc_pause_headline, gc_pause_section
    from report_page_cost import page_cost_headlines, page_cost_section
    from report_plots import plots
    from report_removal import removal_section
    from report_writes import writes_headline
finally:
    del sys.path[0]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # committed: written by full runs of the whole suite only
QUICK_RESULTS = RESULTS / "quick"  # ignored by git (.gitignore): every other run


# -- the run's header, every group's details -----------------------------------------------


def header(data: dict, out: list[str]) -> None:
    info = data.get("machine_info", {})
    run = info.get("diskpages_bench", {})
    fs = run.get("filesystem", {})
    cpu = info.get("cpu", {})
    out.append("# diskpages benchmark report\n\n")
    disk = (
        f"{fs.get('fs_type', '?')} on {fs.get('device', '?')} at {fs.get('mount_point', '?')}"
        f" (journal: {fs.get('journal', '?')}; options {fs.get('options', '?')})"
    )
    commit = run.get("git_commit", "?") + (" with uncommitted changes" if run.get("git_dirty") else "")
    elapsed = run.get("elapsed_s")
    rows = [
        ["date", f"{run.get('finished', data.get('datetime', '?'))}"],
        [
            "machine",
            f"{run.get('cpu_count', '?')} CPUs ({cpu.get('brand_raw', '?')}), kernel {run.get('kernel')}",
        ],
        ["bench root", f"`{run.get('bench_root', '?')}`: {disk}"],
        ["disk states", SPREAD_NOTE.get(run.get("folders_spread"), "?")],
        [
            "Python",
            f"{run.get('python', info.get('python_version', '?'))} ({info.get('python_implementation', '')})",
        ],
        ["diskpages", f"{run.get('diskpages_version', '?')}, commit {commit}"],
        ["command", f"`{run.get('command', '?')}`"],
        [
            "run",
            f"{run.get('mode', '?')} mode, {run.get('rounds', '?')} rounds a group"
            + (f", {elapsed / 60:.1f} minutes" if elapsed else ""),
        ],
    ]
    for name, f in run.get("filesystems", {}).items():
        if "skipped" in f:
            if f["skipped"] != "not used":
                rows.append([f"file system: {FS_LABEL.get(name, name)}", f"not measured: {f['skipped']}"])
            continue
        rows.append(
            [
                f"file system: {FS_LABEL.get(name, name)}",
                f"{f.get('fs_type', '?')} on {f.get('device', '?')} (journal: {f.get('journal', '–')};"
                f" options {f.get('options', '?')})",
            ]
        )
    out.append(table(["run", ""], rows, "ll"))
    out.append(
        "\nEach group runs its contenders in interleaved rounds (`benchmarks/harness.py`). A ratio"
        " is the median over rounds of one contender's time divided by another's in the same"
        " round, ± half the interquartile range; times are medians per operation with their IQR."
        " Fresh and steady disk states are made alike for all contenders (`benchmarks/diskstate.py`):"
        " *fresh* is a part of the disk nobody deleted from lately; *steady* is a block group whose"
        " free inodes were all deleted in the last minutes, so every create scans it.\n"
        "\nThe headline groups also run on a journaled ext4 (a loop-mounted image file on this"
        " disk, default mount options: no discard) and on a tmpfs, both made and removed by the"
        " session (`benchmarks/filesystems.py`). ext4 with a journal does not skip recently"
        " deleted inodes and tmpfs has no inode table, so *steady* there means: every contender"
        f" in a long-lived folder, after {run.get('steady_warmup_rounds', '?')} extra untimed rounds"
        " of the group's own workload (the small-page churn also seasons its folders first);"
        " tmpfs has no steady state for the older groups (skipped with the reason).\n"
    )


def detail_section(data: dict, out: list[str]) -> None:
    out.append("\n## Every group\n\n")
    for g in data["benchmarks"]:
        e = g.get("extra_info", {})
        if "p99_s" in e:
            out.append(f"\n### {e['group']}\n\n")
            out.append(
                f"max_delay {fmt_time(e['max_delay_s'])}: median {fmt_time(e['median_s'])}, "
                f"p99 {fmt_time(e['p99_s'])}, max {fmt_time(e['max_s'])} over {e['samples']} pages\n"
            )
            continue
        cs = e.get("contenders")
        if not cs:
            continue
        peers = [p for p in PEERS if p in cs] if e.get("kind") == "write" else []
        out.append(f"\n### {e['group']}\n\n")
        head = ["contender", f"median per {e.get('unit', 'op')}", "IQR", f"× {e['baseline']}"]
        head += [f"× {p}" for p in peers] + ["rounds"]
        rows = []
        for name, s in cs.items():
            row = [
                name,
                fmt_time(s["median_s"]),
                fmt_time(s["iqr_s"]),
                fmt_ratio((s["ratio"], s["ratio_iqr"])),
            ]
            row += [fmt_ratio(pair_ratio(g, name, p)) if name != p else "1" for p in peers]
            rows.append(row + [str(s["rounds"])])
        out.append(table(head, rows))


# -- main ---------------------------------------------------------------------------------


def dask_section(data: dict, out: list[str]) -> None:
    """diskpages.dask's SpillBuffer against distributed's own, from the same run
    (dask_report.py's tables)."""
    kinds = {g.get("extra_info", {}).get("kind") for g in data["benchmarks"]}
    if not kinds & {"dask_spill", "dask_unspill", "dask_delete", "dask_cluster", "dask_memory"}:
        return
    out.append(
        "\n## dask: diskpages.dask against distributed's own buffer\n\n"
        "`benchmarks/test_dask_spill.py` and `test_dask_memory.py` (their docstrings say what each"
        " group does). Ratios are ours ÷ distributed's SpillBuffer: the median over rounds of the"
        " two times in the same round, ± half the interquartile range (below 1: faster than"
        " distributed's). *dict store (floor)* is distributed's SpillBuffer over a plain dict,"
        " which does no I/O at all.\n\n"
    )
    dask_report.spill_tables(data, out)
    dask_report.delete_table(data, out)
    dask_report.cluster_table(data, out)
    dask_report.memory_table(data, out)


def render(data: dict, folder: Path) -> str:
    out: list[str] = []
    header(data, out)
    writes_headline(data, out)
    cleanup_section(data, out)
    gc_pause_section(data, out)
    page_cost_section(data, out)
    removal_section(data, out)
    churn_section(data, out)
    dask_section(data, out)
    plots(data, folder, out)
    detail_section(data, out)
    return "".join(out)


def default_out(data: dict) -> Path:
    """benchmarks/results/ for a full run of the whole suite (a run from before conftest.py
    recorded whole_suite counts as one), benchmarks/results/quick/ for any other."""
    run = data.get("machine_info", {}).get("diskpages_bench", {})
    return RESULTS if run.get("mode") == "full" and run.get("whole_suite", True) else QUICK_RESULTS


def headlines(data: dict) -> list[str]:
    """A few ratios that say the most, each from one group of the run (those it has)."""
    lines = []
    for f in filesystems_in(groups_of(data, "small_churn")):
        for state in ("steady", "fresh"):
            g = find(data, "small_churn", f, state=state, size_label="4KiB")
            if g is None or "diskpages" not in g["extra_info"]["contenders"]:
                continue
            cs = g["extra_info"]["contenders"]
            against = [a for a in ("python loop", "diskcache", "zict.File") if a in cs]
            ratios = ", ".join(f"÷ {a} {fmt_ratio(pair_ratio(g, 'diskpages', a))}" for a in against)
            lines.append(f"churn of 4 KiB pages, {state}, {FS_LABEL.get(f, f)}: {ratios}")
            break
    for size in ("4KiB", "1MiB"):
        g = find_write(data, size, "none", "fresh")
        if g is not None:
            ratio = fmt_ratio(pair_ratio(g, "write()", "floor"))
            lines.append(f"write() of {size} pages, fresh, sync none, this disk: ÷ C floor {ratio}")
    g = find(data, "removal", "thisdisk", data="written back", state="fresh")
    if g is not None:
        ratio = fmt_ratio(pair_ratio(g, "flush, io_uring", g["extra_info"]["baseline"]))
        lines.append(f"remove_released() of written-back files, fresh, this disk: ÷ C unlinkat loop {ratio}")
    for g in groups_of(data, "release"):
        if g["extra_info"]["state"] == "fresh":
            ratio = fmt_ratio(pair_ratio(g, "diskpages Page", "naive __del__ + os.unlink"))
            lines.append(f"dropping a page, fresh: ÷ naive __del__ + os.unlink {ratio}")
    lines += gc_pause_headline(data)
    lines += page_cost_headlines(data)
    # dask: what a worker's event loop pays to delete spilled keys, and a cluster's wall time
    for g in groups_of(data, "dask_delete"):
        e = g["extra_info"]
        if e.get("data") == "written back" and e.get("fs") == "thisdisk":
            ratio = fmt_ratio(pair_ratio(g, "diskpages", "distributed"))
            what = "dask: deleting spilled 64 KiB keys, the caller's time"
            lines.append(f"{what}: ÷ distributed's buffer {ratio}")
    for g in groups_of(data, "dask_cluster"):
        e = g["extra_info"]
        ratio = fmt_ratio(pair_ratio(g, "diskpages", "distributed"))
        lines.append(
            f"dask: a LocalCluster's wall time, {e['total_bytes'] >> 20} MiB in {e['chunk'] >> 10} KiB "
            f"chunks, spill {e['spill']}: ÷ distributed's buffer {ratio}"
        )
    return lines


LEGEND = (
    "fresh: a part of the disk nobody deleted from lately; steady: a block group whose free inodes "
    "were all just deleted, where every create scans the group, as in any job that makes and drops "
    "more than ~25 files a second; C floor: the same system calls from C with no Python, the least "
    "any library can pay (REPORT.md says more)"
)


def summary(data: dict, report: Path) -> str:
    run = data.get("machine_info", {}).get("diskpages_bench", {})
    elapsed = run.get("elapsed_s")
    took = f", {elapsed / 60:.1f} minutes" if elapsed else ""
    written = run.get("written_bytes")
    took += f", {written / 1e9:.1f} GB written to the disk" if written is not None else ""
    out = [f"diskpages benchmarks: {run.get('mode', '?')} run, {run.get('rounds', '?')} rounds a group{took}"]
    lines = headlines(data)
    if lines:
        out.append("diskpages' time ÷ the other's, median over rounds ± half the IQR (below 1: faster):")
        out += [f"  {line}" for line in lines]
        out.append(LEGEND)
    out.append(f"report (every table; plots beside it): {report}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument(
        "--out",
        help="folder for REPORT.md and the plots (default: benchmarks/results/ for a full run of "
        "the whole suite, else benchmarks/results/quick/, which git ignores)",
    )
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    folder = Path(args.out) if args.out else default_out(data)
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "REPORT.md"
    report.write_text(render(data, folder))
    print(summary(data, report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
