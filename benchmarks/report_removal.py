"""The removal group's tables: remove_released() against a C unlinkat loop."""

from __future__ import annotations

from report_format import (
    FS_LABEL,
    STATES,
    filesystems_in,
    fmt_ratio,
    fmt_time,
    fs_of,
    groups_of,
    pair_ratio,
    side_by_side,
    table,
)


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
