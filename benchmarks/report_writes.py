"""The writes group's tables: write() against its C floor, its peers, each filesystem."""

from __future__ import annotations

from report_format import (
    DISKPAGES_WRITES,
    PEERS,
    SIZE_ORDER,
    STATES,
    SYNC_ORDER,
    filesystems_in,
    find_write,
    fmt_ratio,
    fmt_time,
    groups_of,
    pair_ratio,
    side_by_side,
    table,
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
