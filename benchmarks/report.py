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
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # committed: written by full runs of the whole suite only
QUICK_RESULTS = RESULTS / "quick"  # ignored by git (.gitignore): every other run
SIZE_ORDER = ["4KiB", "64KiB", "1MiB", "16MiB"]
SYNC_ORDER = ["none", "data", "full"]
STATES = ["fresh", "steady"]
DISKPAGES_WRITES = ["write()", "write_many()", "allocate()", "write() pack_max=0"]
SPREAD_NOTE = {
    True: "fresh folders spread over the disk (ext4 TOPDIR flag on the session root)",
    False: "fresh folders NOT spread (the TOPDIR flag could not be set): fresh means less",
    None: "not recorded",
}
PEERS = ["numpy.save", "zict.File", "diskcache", "tablite model"]
FS_ORDER = ["thisdisk", "ext4-journal", "tmpfs"]  # filesystems.py
FS_LABEL = {"thisdisk": "this disk", "ext4-journal": "ext4-journal", "tmpfs": "tmpfs"}
CHURN_SIZES = ["4KiB", "16KiB", "64KiB", "256KiB"]
CHURN_OURS = ["diskpages", "diskpages pack_max=0", "diskpages write_many()"]
CHURN_AGAINST = [
    "python loop",
    "diskcache",
    "zict.File",
    "C floor: file per page",
    "C floor: slots in one file",
]


# -- formatting ----------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(ratio: tuple[float, float] | None) -> str:
    if ratio is None:
        return "–"
    med, iqr = ratio
    if med < 0.1:  # e.g. diskpages' release against the naive unlink: keep the digits
        return f"{med:.2g} ± {iqr / 2:.1g}"
    return f"{med:.2f} ± {iqr / 2:.2f}"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- reading the run -----------------------------------------------------------------------


def pair_ratio(group: dict, a: str, b: str) -> tuple[float, float] | None:
    """Median and IQR over rounds of a's time per operation over b's, same round."""
    cs = group["extra_info"].get("contenders", {})
    if a not in cs or b not in cs:
        return None
    xa = [t / cs[a]["per_round"] for t in cs[a]["times_s"]]
    xb = [t / cs[b]["per_round"] for t in cs[b]["times_s"]]
    ratios = [x / y for x, y in zip(xa, xb, strict=True)]
    if len(ratios) < 2:
        return ratios[0], 0.0
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return med, q3 - q1


def groups_of(data: dict, kind: str) -> list[dict]:
    return [b for b in data["benchmarks"] if b.get("extra_info", {}).get("kind") == kind]


def fs_of(group: dict) -> str:
    """The file system a group ran on (a run from before filesystems.py: this disk)."""
    return group["extra_info"].get("fs", "thisdisk")


def filesystems_in(groups: list[dict]) -> list[str]:
    seen = {fs_of(g) for g in groups}
    return [f for f in FS_ORDER if f in seen] + sorted(seen - set(FS_ORDER))


def find_write(data: dict, size: str, sync: str, state: str, fs: str = "thisdisk") -> dict | None:
    for b in groups_of(data, "write"):
        e = b["extra_info"]
        if (e["size_label"], e["sync"], e["state"], fs_of(b)) == (size, sync, state, fs):
            return b
    return None


def find(data: dict, kind: str, fs: str, /, **match) -> dict | None:
    for b in groups_of(data, kind):
        e = b["extra_info"]
        if fs_of(b) == fs and all(e.get(k) == v for k, v in match.items()):
            return b
    return None


def side_by_side(
    data: dict, kind: str, keys: list[tuple], match_of, cells_of, cell_names: list[str], key_names: list[str]
) -> str:
    """A table with one row per key and, per file system, the columns ``cell_names``:
    ``cells_of(group)`` fills them from the group ``match_of(key)`` picks on that file system."""
    systems = filesystems_in(groups_of(data, kind))
    head = list(key_names)
    for f in systems:
        head += [f"{FS_LABEL.get(f, f)}: {c}" if c else FS_LABEL.get(f, f) for c in cell_names]
    rows = []
    for key in keys:
        row, any_found = [str(k) for k in key], False
        for f in systems:
            g = find(data, kind, f, **match_of(key))
            cells = cells_of(g, key) if g is not None else None
            any_found |= cells is not None
            row += cells if cells is not None else ["–"] * len(cell_names)
        if any_found:
            rows.append(row)
    if not rows:
        return ""
    return table(head, rows, "l" * len(key_names) + "r" * (len(head) - len(key_names)))


# -- sections ------------------------------------------------------------------------------


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


def writes_headline(data: dict, out: list[str]) -> None:
    out.append("\n## Writes\n\n")
    out.append(
        "On this disk. Ratio of time per page to the floor (a C loop: openat + pwrite [+ fdatasync] + close"
        " [+ fsync of the folder]); below 1 is faster. *floor O_TMPFILE* is the same loop making"
        " pages nameless first and linking them when whole (open(O_TMPFILE) + pwrite + linkat)."
        " Peers have no sync knob and are measured with sync=none only; *best peer* is the"
        " fastest of numpy.save, zict.File, diskcache and a model of tablite's page store, and"
        " the last column is `write()` against it, round by round.\n\n"
    )
    rows = []
    for state in STATES:
        for size in SIZE_ORDER:
            for sync in SYNC_ORDER:
                g = find_write(data, size, sync, state)
                if g is None:
                    continue
                cs = g["extra_info"]["contenders"]
                row = [state, size, sync, fmt_time(cs["floor"]["median_s"])]
                row += [fmt_ratio(pair_ratio(g, name, "floor")) for name in DISKPAGES_WRITES]
                row += [
                    fmt_ratio(pair_ratio(g, name, "floor")) for name in ("python loop", "floor O_TMPFILE")
                ]
                peers = [p for p in PEERS if p in cs]
                if peers:
                    best = min(peers, key=lambda p: cs[p]["median_s"])
                    row += [
                        f"{best}: {fmt_ratio(pair_ratio(g, best, 'floor'))}",
                        fmt_ratio(pair_ratio(g, "write()", best)),
                    ]
                else:
                    row += ["(no sync knob)", "–"]
                rows.append(row)
    head = [
        "state",
        "page",
        "sync",
        "floor per page",
        *DISKPAGES_WRITES,
        "python loop",
        "floor O_TMPFILE",
        "best peer",
        "write() / best peer",
    ]
    out.append(table(head, rows, "lll" + "r" * (len(head) - 3)))
    missing = {}
    for g in groups_of(data, "write"):
        missing.update(g["extra_info"].get("missing_peers", {}))
    for why in missing.values():
        out.append(f"\nNot measured: {why}\n")
    spread = set()
    for g in groups_of(data, "write"):
        if g["extra_info"]["state"] == "steady":
            spread.update(v for v in g["extra_info"].get("block_groups", {}).values() if v is not None)
    if spread:
        out.append(
            f"\nSteady state: every contender's folder sat in block group(s) {sorted(spread)} "
            "(one shared, saturated part of the disk).\n"
        )
    if len(filesystems_in(groups_of(data, "write"))) > 1:
        out.append(
            "\n### Writes, file systems side by side\n\nPer file system: the floor's time per page,"
            " and `write()` and the Python loop against the floor in the same rounds.\n\n"
        )
        keys = [(st, sz, sy) for st in STATES for sz in SIZE_ORDER for sy in SYNC_ORDER]

        def cells(g, key):
            cs = g["extra_info"]["contenders"]
            return [
                fmt_time(cs["floor"]["median_s"]),
                fmt_ratio(pair_ratio(g, "write()", "floor")),
                fmt_ratio(pair_ratio(g, "python loop", "floor")),
            ]

        out.append(
            side_by_side(
                data,
                "write",
                keys,
                lambda k: {"state": k[0], "size_label": k[1], "sync": k[2]},
                cells,
                ["floor", "write()", "python"],
                ["state", "page", "sync"],
            )
        )


def cleanup_section(data: dict, out: list[str]) -> None:
    out.append("\n## Cleanup: refcount against cycle collection\n\n")
    out.append(
        "Each iteration writes a 64 KiB page into a holder object; the newest holders stay"
        " referenced (the window) and the oldest is dropped. *Latency* is from dropping the"
        " last reference (or calling release()/close()) to the file being gone, seen by"
        " inotify; *not gone* counts pages still on disk a settle time after the loop ended"
        " (p99 shows *not gone* when more than 1% were). *Peak* is the most pages of the"
        " workload on disk at once. *gc runs* are the collections the program did not ask for,"
        " per round by generation (gen0/gen1/gen2; with a budget, write() runs full ones), plus"
        " the loop's own collect() calls; *longest pause* is the longest of all of these"
        " (a collect() call timed whole, removal included).\n\n"
    )
    for kind, title in (("cleanup", "Cleanup arms"), ("churn", "Churn")):
        for g in groups_of(data, "cleanup"):
            e = g["extra_info"]
            is_churn = e.get("window") == 0
            if is_churn != (kind == "churn"):
                continue
            out.append(f"\n### {title}: {e['group']}\n\n")
            rows = []
            for name, s in e["contenders"].items():
                a = e["arms"][name]

                def latency(x, a=a, note=False):  # None with pages not gone: beyond the round
                    if x is not None or not a["not_gone_fraction"]:
                        return fmt_time(x)
                    gone = a.get("latency_median_gone_s")
                    if note and gone is not None:
                        return f"not gone (those gone: {fmt_time(gone)})"
                    return "not gone"

                runs = "/".join(f"{x:g}" for x in a["gc_runs_per_round"])
                if a.get("collect_calls_per_round"):
                    runs += f" + {a['collect_calls_per_round']:g} collect()"
                rows.append(
                    [
                        name,
                        fmt_time(s["median_s"]),
                        f"{1 / s['median_s']:,.0f}",
                        fmt_ratio((s["ratio"], s["ratio_iqr"])),
                        latency(a["latency_median_s"], note=True),
                        latency(a["latency_p99_s"]),
                        f"{a['not_gone_fraction']:.1%}",
                        f"{a['peak_pages']} ({fmt_bytes(a['peak_bytes'])})",
                        runs,
                        fmt_time(max(a["gc_pause_max_s"], a.get("collect_max_s", 0.0))),
                    ]
                )
            head = [
                "arm",
                "time per page",
                "pages/s",
                f"× {e['baseline']}",
                "latency median",
                "latency p99",
                "not gone",
                "peak on disk",
                "gc runs",
                "longest pause",
            ]
            out.append(table(head, rows))
            notes = [
                f"gc thresholds {tuple(e['gc_threshold'])}, "
                f"{e['gc_objects_at_start']} objects tracked at the start"
            ]
            if e.get("budget_bytes"):
                notes.append(f"budget max_bytes={fmt_bytes(e['budget_bytes'])}")
            if any(a.get("watcher_overflowed") for a in e["arms"].values()):
                notes.append("**the inotify queue overflowed: some events were lost**")
            if not all(a.get("watcher_realtime", True) for a in e["arms"].values()):
                notes.append(
                    "the inotify reader ran without real-time priority: on a busy machine its stamps lag"
                )
            out.append("\n" + "; ".join(notes) + ".\n")
    cleanup_side_by_side(data, out)


def cleanup_side_by_side(data: dict, out: list[str]) -> None:
    groups = groups_of(data, "cleanup")
    if len(filesystems_in(groups)) < 2:
        return
    out.append(
        "\n### Cleanup and churn, file systems side by side\n\nPer arm: time per page, its ratio"
        " to the group's baseline in the same rounds, and the median latency from drop to file"
        " gone.\n\n"
    )
    keys = []
    for g in groups:
        e = g["extra_info"]
        what = "churn" if e.get("window") == 0 else "cleanup"
        if e.get("budget_bytes"):
            what += f", max_bytes={fmt_bytes(e['budget_bytes'])}"
        for arm in e["arms"]:
            key = (what, e["state"], arm)
            if key not in keys:
                keys.append(key)

    def match(key):
        return {"state": key[1]}

    def cells(_g, key):  # several groups share state and fs: pick the one of this key
        for g in groups:
            e = g["extra_info"]
            what = "churn" if e.get("window") == 0 else "cleanup"
            if e.get("budget_bytes"):
                what += f", max_bytes={fmt_bytes(e['budget_bytes'])}"
            if fs_of(g) == fs_of(_g) and e["state"] == key[1] and what == key[0] and key[2] in e["arms"]:
                s, a = e["contenders"][key[2]], e["arms"][key[2]]
                lat = a["latency_median_s"]
                return [
                    fmt_time(s["median_s"]),
                    fmt_ratio((s["ratio"], s["ratio_iqr"])),
                    "not gone" if lat is None and a["not_gone_fraction"] else fmt_time(lat),
                ]
        return None

    out.append(
        side_by_side(
            data, "cleanup", keys, match, cells, ["per page", "× base", "latency"], ["group", "state", "arm"]
        )
    )


def churn_section(data: dict, out: list[str]) -> None:
    groups = groups_of(data, "small_churn")
    if not groups:
        return
    e0 = groups[0]["extra_info"]
    out.append("\n## Small-page churn\n\n")
    out.append(
        f"A window of {e0['window']:,} live pages; each step writes one page and drops the oldest"
        f" ({e0['steps']:,} steps a round). *fresh*: a new folder every round, the window filled"
        " untimed first; *steady*: one long-lived folder per contender, filled and churned for"
        f" {e0['season_steps']:,} steps before the rounds, the window carried from round to round."
        " diskpages removes files in its own C thread (the machine's other core): its time is the"
        " caller's. Times are per step (one page written and one dropped).\n"
    )
    if not all(g["extra_info"].get("pack_max_supported") for g in groups):
        out.append(
            "\n**`PageCache(pack_max=...)` was not in the diskpages measured: the rows *diskpages*"
            " and *diskpages pack_max=0* are both today's file-per-page path.**\n"
        )
    missing = {}
    for g in groups:
        missing.update(g["extra_info"].get("missing_peers", {}))
    for why in missing.values():
        out.append(f"\nNot measured: {why}\n")
    names: list[str] = []
    for g in groups:
        names += [n for n in g["extra_info"]["contenders"] if n not in names]
    out.append("\n### Time per step\n\n")
    keys = [(st, sz, n) for st in STATES for sz in CHURN_SIZES for n in names]

    def per_step(g, key):
        s = g["extra_info"]["contenders"].get(key[2])
        return [fmt_time(s["median_s"])] if s else None

    out.append(
        side_by_side(
            data,
            "small_churn",
            keys,
            lambda k: {"state": k[0], "size_label": k[1]},
            per_step,
            [""],
            ["state", "page", "contender"],
        )
    )
    out.append(
        "\n### diskpages against the others, same rounds\n\nMedian over rounds of diskpages'"
        " time per step divided by the other's in the same round (below 1: diskpages is"
        " faster).\n\n"
    )
    keys = [(st, sz, ours) for st in STATES for sz in CHURN_SIZES for ours in CHURN_OURS]
    against = [a for a in CHURN_AGAINST if any(a in g["extra_info"]["contenders"] for g in groups)]

    def ratios(g, key):
        if key[2] not in g["extra_info"]["contenders"]:
            return None
        return [fmt_ratio(pair_ratio(g, key[2], a)) for a in against]

    short = {
        "python loop": "÷ python",
        "C floor: file per page": "÷ C file",
        "C floor: slots in one file": "÷ C slots",
    }
    out.append(
        side_by_side(
            data,
            "small_churn",
            keys,
            lambda k: {"state": k[0], "size_label": k[1]},
            ratios,
            [short.get(a, f"÷ {a}") for a in against],
            ["state", "page", "diskpages"],
        )
    )
    out.append(
        "\n### Bytes on disk\n\nThe files' blocks (st_blocks × 512) at the end of the trace pass"
        " (window filled, then churned), as a multiple of the live data (window × page size);"
        " the plots show them over the whole pass.\n\n"
    )
    keys = [(st, sz, n) for st in STATES for sz in CHURN_SIZES for n in names]

    def on_disk(g, key):
        trace = g["extra_info"].get("traces", {}).get(key[2])
        if not trace:
            return None
        return [f"{trace[-1][2] / g['extra_info']['live_bytes']:.2f}"]

    out.append(
        side_by_side(
            data,
            "small_churn",
            keys,
            lambda k: {"state": k[0], "size_label": k[1]},
            on_disk,
            [""],
            ["state", "page", "contender"],
        )
    )


def gc_pause_section(data: dict, out: list[str]) -> None:
    groups = sorted(
        groups_of(data, "gc_pause"), key=lambda g: (g["extra_info"]["state"], g["extra_info"]["pending"])
    )
    if not groups:
        return
    out.append("\n## gc pause against pending cyclic pages\n\n")
    out.append(
        "One `gc.collect()` (or `cache.collect()`: collect, then remove the files in the caller's"
        " thread) when N objects wait in reference cycles, gc disabled meanwhile; the pause in"
        " total and its ratio to the same number of plain objects in cycles. The pages are"
        " 4 KiB files still in the page cache (the cheap case for the naive design).\n\n"
    )
    names = list(groups[0]["extra_info"]["contenders"])
    rows = []
    for g in groups:
        e = g["extra_info"]
        cs = e["contenders"]
        row = [e["state"], f"{e['pending']:,}"]
        for name in names:
            s = cs[name]
            row.append(
                f"{fmt_time(s['median_s'] * s['per_round'])} ({fmt_ratio((s['ratio'], s['ratio_iqr']))})"
            )
        rows.append(row)
    out.append(table(["state", "pending", *names], rows, "ll" + "r" * len(names)))


def removal_section(data: dict, out: list[str]) -> None:
    removal = groups_of(data, "removal")
    release = groups_of(data, "release")
    if not removal and not release:
        return
    out.append("\n## Removal and release\n\n")
    if removal:
        out.append(
            "Removing N released 4 KiB pages: ratio of time per file to an unlinkat loop in C."
            " *Written back*: each file fdatasync'ed when made, so each unlink waits for the discard of the"
            " file's blocks; *in page cache*: the files have no blocks yet.\n\n"
        )
        names = list(removal[0]["extra_info"]["contenders"])
        base = removal[0]["extra_info"]["baseline"]
        rows = []
        for g in removal:
            e = g["extra_info"]
            cs = e["contenders"]
            row = [FS_LABEL.get(fs_of(g), fs_of(g)), e["data"], e["state"], f"{cs[base]['per_round']:,}"]
            row += [fmt_time(cs[base]["median_s"])]
            row += [fmt_ratio(pair_ratio(g, name, base)) for name in names if name != base]
            rows.append(row)
        head = ["file system", "files", "state", "N", f"{base} per file", *(n for n in names if n != base)]
        out.append(table(head, rows, "lll" + "r" * (len(head) - 3)))
        if len(filesystems_in(removal)) > 1:
            out.append(
                "\nSide by side: the C loop's time per file, and `remove_released()` through io_uring and"
                " the Python loop against it in the same rounds.\n\n"
            )
            keys = [(d, st) for d in ("written back", "in page cache") for st in STATES]

            def cells(g, key):
                cs = g["extra_info"]["contenders"]
                return [
                    fmt_time(cs[base]["median_s"]),
                    fmt_ratio(pair_ratio(g, "flush, io_uring", base)),
                    fmt_ratio(pair_ratio(g, "os.unlink loop", base)),
                ]

            out.append(
                side_by_side(
                    data,
                    "removal",
                    keys,
                    lambda k: {"data": k[0], "state": k[1]},
                    cells,
                    ["C loop", "flush", "os.unlink"],
                    ["files", "state"],
                )
            )
    if release:
        out.append(
            "\nRelease on the caller's path: the time to drop the last reference to a page (its"
            " deallocation and finalizer), per page, and its ratio to an object with an empty"
            " `__del__` (the interpreter's own cost) and to the naive design's `__del__` +"
            " `os.unlink`.\n\n"
        )
        names = list(release[0]["extra_info"]["contenders"])
        naive = next((n for n in names if n.startswith("naive")), None)
        rows = []
        for g in release:
            e = g["extra_info"]
            for name in names:
                s = e["contenders"][name]
                rows.append(
                    [
                        e["state"],
                        name,
                        fmt_time(s["median_s"]),
                        fmt_ratio((s["ratio"], s["ratio_iqr"])),
                        fmt_ratio(pair_ratio(g, name, naive)) if naive else "–",
                    ]
                )
        head = ["state", "object", "per page", f"× {release[0]['extra_info']['baseline']}", f"× {naive}"]
        out.append(table(head, rows, "llrrr"))


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


# -- plots ---------------------------------------------------------------------------------


def plots(data: dict, folder: Path, out: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out.append("\n(Plots not drawn: matplotlib is not installed; pip install '.[bench]'.)\n")
        return
    made = []
    if groups_of(data, "write"):
        made.append(plot_throughput(data, folder, plt))
    if any(g["extra_info"].get("window") for g in groups_of(data, "cleanup")):
        made.append(plot_on_disk(data, folder, plt, churn=False))
    if any(g["extra_info"].get("window") == 0 for g in groups_of(data, "cleanup")):
        made.append(plot_on_disk(data, folder, plt, churn=True))
    if groups_of(data, "gc_pause"):
        made.append(plot_gc_pause(data, folder, plt))
    if groups_of(data, "small_churn"):
        made.append(plot_churn_time(data, folder, plt))
        for state in STATES:
            if any(g["extra_info"]["state"] == state for g in groups_of(data, "small_churn")):
                made.append(plot_churn_bytes(data, folder, plt, state))
    out.append("\n## Plots\n\n")
    for name, caption in made:
        out.append(f"![{caption}]({name})\n\n*{caption}*\n\n")


def plot_throughput(data, folder, plt):
    names = []  # every contender, in first-seen order, so each keeps its colour in every panel
    for g in groups_of(data, "write"):
        names += [n for n in g["extra_info"]["contenders"] if n not in names]
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True, squeeze=False)
    for row, state in enumerate(STATES):
        for col, sync in enumerate(SYNC_ORDER):
            ax = axes[row][col]
            lines: dict[str, list[tuple[int, float]]] = {}
            for size in SIZE_ORDER:
                g = find_write(data, size, sync, state)
                if g is None:
                    continue
                for name, s in g["extra_info"]["contenders"].items():
                    lines.setdefault(name, []).append(
                        (g["extra_info"]["size"], g["extra_info"]["size"] / s["median_s"] / 1e6)
                    )
            for name, pts in lines.items():
                style = "-" if name in DISKPAGES_WRITES else ":" if name.startswith("floor") else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=colour[name], label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"sync={sync}, {state}")
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("MB/s (median)")
            if row == 1:
                ax.set_xlabel("page size (bytes)")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
            labels[label] = label
    fig.legend(list(handles.values()), list(labels), loc="lower center", ncol=5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    name = "throughput_by_page_size.png"
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name, "Write throughput by page size per contender (diskpages solid, floors dotted, others dashed)"


def plot_on_disk(data, folder, plt, churn: bool):
    """One panel per group and way of dropping pages (cleanup: diskpages solid and the
    naive design dashed, the k-th arm of each side together; churn: every arm), each on
    its own time axis, so that a slow arm does not squash the others."""
    groups = [g for g in groups_of(data, "cleanup") if (g["extra_info"].get("window") == 0) == churn]
    panels: list[tuple[dict, list[str]]] = []
    for g in groups:
        arms = list(g["extra_info"]["arms"])
        if churn:
            panels.append((g, arms))
        else:
            ours = [a for a in arms if not a.startswith("naive")]
            naive = [a for a in arms if a.startswith("naive")]
            panels += [(g, [a, *naive[k : k + 1]]) for k, a in enumerate(ours)]
    cols = 2 if churn else 4
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (g, names) in zip(axes.flat, panels, strict=False):
        e = g["extra_info"]
        for name in names:
            series = e["arms"][name]["series"]
            if series:
                t, pages = zip(*series, strict=True)
                style = "--" if name.startswith("naive") else "-"
                mib = [p * e["page_bytes"] / (1 << 20) for p in pages]
                ax.step([x * 1e3 for x in t], mib, style, where="post", label=name)
        what = e["state"] + (f", max_bytes={e['budget_bytes'] >> 20} MiB" if e.get("budget_bytes") else "")
        where = "" if fs_of(g) == "thisdisk" else f" [{FS_LABEL.get(fs_of(g), fs_of(g))}]"
        ax.set_title((what if churn else f"{e['state']}: {names[0].split(': ', 1)[1]}") + where, fontsize=9)
        ax.set_xlabel("ms since the loop began (last round)", fontsize=8)
        ax.set_ylabel("MiB of its pages on disk", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    name = "churn_bytes_on_disk.png" if churn else "cleanup_bytes_on_disk.png"
    fig.savefig(folder / name, dpi=80)
    plt.close(fig)
    if churn:
        return (
            name,
            "Bytes on disk over time: churn (a page made in a cycle and dropped at once, 64 KiB pages)",
        )
    return name, (
        "Bytes on disk over time for the four cleanup arms (64 KiB pages, window of 32): "
        "diskpages solid, the naive __del__ design dashed"
    )


def _churn_colours(data):
    names: list[str] = []
    for g in groups_of(data, "small_churn"):
        names += [n for n in g["extra_info"]["contenders"] if n not in names]
    return names, {name: f"C{i % 10}" for i, name in enumerate(names)}


def _churn_style(name: str) -> str:
    return "-" if name.startswith("diskpages") else ":" if name.startswith("C floor") else "--"


def _legend_below(fig, handles: dict, ncol: int) -> None:
    """One legend for all panels, under them, with room kept for it whatever the size."""
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8)
    lines = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, min(0.4, (0.22 * lines + 0.1) / fig.get_figheight()), 1, 1))


def plot_churn_time(data, folder, plt):
    groups = groups_of(data, "small_churn")
    systems = filesystems_in(groups)
    states = [s for s in STATES if any(g["extra_info"]["state"] == s for g in groups)]
    names, colour = _churn_colours(data)
    fig, axes = plt.subplots(
        len(states),
        len(systems),
        figsize=(max(9, 5 * len(systems)), 4 * len(states)),
        squeeze=False,
        sharey=True,
    )
    for row, state in enumerate(states):
        for col, f in enumerate(systems):
            ax = axes[row][col]
            for name in names:
                pts = []
                for size in CHURN_SIZES:
                    g = find(data, "small_churn", f, state=state, size_label=size)
                    if g is not None and name in g["extra_info"]["contenders"]:
                        pts.append(
                            (g["extra_info"]["size"], g["extra_info"]["contenders"][name]["median_s"] * 1e6)
                        )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        _churn_style(name),
                        marker="o",
                        color=colour[name],
                        label=name,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{FS_LABEL.get(f, f)}, {state}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("µs per step (median)")
            ax.set_xlabel("page size (bytes)")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    _legend_below(fig, handles, 4)
    name = "small_churn_time.png"
    fig.savefig(folder / name, dpi=80)
    plt.close(fig)
    return name, (
        "Small-page churn: time per step (one page written, the oldest dropped) by page size, per file"
        " system and state (diskpages solid, C floors dotted, others dashed)"
    )


def plot_churn_bytes(data, folder, plt, state):
    groups = [g for g in groups_of(data, "small_churn") if g["extra_info"]["state"] == state]
    systems = filesystems_in(groups)
    sizes = [s for s in CHURN_SIZES if any(g["extra_info"]["size_label"] == s for g in groups)]
    names, colour = _churn_colours(data)
    fig, axes = plt.subplots(
        len(sizes), len(systems), figsize=(max(9, 5 * len(systems)), 3.2 * len(sizes)), squeeze=False
    )
    for row, size in enumerate(sizes):
        for col, f in enumerate(systems):
            ax = axes[row][col]
            g = find(data, "small_churn", f, state=state, size_label=size)
            if g is None:
                ax.set_visible(False)
                continue
            e = g["extra_info"]
            for name, trace in e.get("traces", {}).items():
                if trace:
                    steps = [p[1] for p in trace]
                    mib = [p[2] / (1 << 20) for p in trace]
                    ax.plot(steps, mib, _churn_style(name), color=colour[name], label=name)
            ax.axhline(e["live_bytes"] / (1 << 20), color="black", lw=0.8, alpha=0.5, label="live data")
            ax.axvline(e["window"], color="grey", lw=0.6, ls=":", alpha=0.6)
            ax.set_title(f"{FS_LABEL.get(f, f)}, {size} pages, {state}", fontsize=9)
            ax.set_xlabel("pages written (window filled at the dotted line)", fontsize=8)
            ax.set_ylabel("MiB of files on disk", fontsize=8)
            ax.grid(True, alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    _legend_below(fig, handles, 4)
    name = f"small_churn_bytes_on_disk_{state}.png"
    fig.savefig(folder / name, dpi=75)
    plt.close(fig)
    return name, (
        f"Small-page churn, {state}: bytes the contender's files occupy on disk while the window"
        " fills and churns (sampled; the black line is the live data)"
    )


def plot_gc_pause(data, folder, plt):
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for g in groups_of(data, "gc_pause"):
        e = g["extra_info"]
        for name, s in e["contenders"].items():
            series.setdefault((name, e["state"]), []).append((e["pending"], s["median_s"] * s["per_round"]))
    for (name, state), pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts, strict=True), "-o" if state == "fresh" else "x", label=f"{name} ({state})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("objects pending in reference cycles")
    ax.set_ylabel("pause of one collection (s, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "gc_pause.png"
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name, "gc pause against the number of pending cyclic objects"


# -- main ----------------------------------------------------------------------------------


def render(data: dict, folder: Path) -> str:
    out: list[str] = []
    header(data, out)
    writes_headline(data, out)
    cleanup_section(data, out)
    gc_pause_section(data, out)
    removal_section(data, out)
    churn_section(data, out)
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
    return lines


def summary(data: dict, report: Path) -> str:
    run = data.get("machine_info", {}).get("diskpages_bench", {})
    elapsed = run.get("elapsed_s")
    took = f", {elapsed / 60:.1f} minutes" if elapsed else ""
    out = [f"diskpages benchmarks: {run.get('mode', '?')} run, {run.get('rounds', '?')} rounds a group{took}"]
    lines = headlines(data)
    if lines:
        out.append("diskpages' time ÷ the other's, median over rounds ± half the IQR (below 1: faster):")
        out += [f"  {line}" for line in lines]
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
