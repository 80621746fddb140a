"""The report's shared ground: labels, number formats, tables, finding groups in a run.

Every table room (report_*.py) builds on these; report.py puts the rooms together."""

from __future__ import annotations

import statistics

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
    "Python pwrite: slots in one file",
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
