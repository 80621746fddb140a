"""The cleanup group's tables: bytes on disk while pages are dropped."""

from __future__ import annotations

from report_format import (
    filesystems_in,
    fmt_bytes,
    fmt_ratio,
    fmt_time,
    fs_of,
    groups_of,
    side_by_side,
    table,
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
