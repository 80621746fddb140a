"""The small churn group's tables: writing, dropping small pages over time."""

from __future__ import annotations

from report_format import (
    CHURN_AGAINST,
    CHURN_OURS,
    CHURN_SIZES,
    STATES,
    fmt_ratio,
    fmt_time,
    groups_of,
    pair_ratio,
    side_by_side,
)


def churn_section(data: dict, out: list[str]) -> None:
    groups = groups_of(data, "small_churn")
    if not groups:
        return
    e0 = groups[0]["extra_info"]
    by_size = {g["extra_info"]["size_label"]: g["extra_info"] for g in groups}
    steps = {e["steps"] for e in by_size.values()}
    steps_said = (
        f"{e0['steps']:,} steps a round"
        if len(steps) == 1
        else "steps a round: "
        + ", ".join(f"{by_size[s]['steps']:,} at {s}" for s in CHURN_SIZES if s in by_size)
    )
    fewer = sorted({e.get("diskcache_steps") for e in by_size.values()} - steps - {None})
    if fewer:
        steps_said += "; diskcache a third of them"
    out.append("\n## Small-page churn\n\n")
    out.append(
        f"A window of {e0['window']:,} live pages; each step writes one page and drops the oldest"
        f" ({steps_said}). *fresh*: a new folder every round, the window filled"
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
        "Python pwrite: slots in one file": "÷ Py slots",
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
