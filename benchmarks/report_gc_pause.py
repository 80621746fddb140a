"""The gc pause group's table: a collection's pause against pending cyclic pages."""

from __future__ import annotations

from report_format import (
    fmt_ratio,
    fmt_time,
    groups_of,
    pair_ratio,
    table,
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


def gc_pause_headline(data: dict) -> list[str]:
    """The largest pending size, fresh: gc.collect() with cycles holding pages against the
    same cycles holding None."""
    groups = [g for g in groups_of(data, "gc_pause") if g["extra_info"]["state"] == "fresh"]
    if not groups:
        return []
    g = max(groups, key=lambda g: g["extra_info"]["pending"])
    ratio = fmt_ratio(pair_ratio(g, "diskpages: gc.collect()", "plain objects"))
    n = g["extra_info"]["pending"]
    return [f"gc pause, {n:,} pending cycles holding pages, fresh: ÷ the same cycles holding None {ratio}"]
