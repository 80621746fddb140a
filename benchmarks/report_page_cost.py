"""The page cost group's table and headlines: what one small packed page costs."""

from __future__ import annotations

from report_format import fmt_ratio, fmt_time, groups_of, table


def _what(e: dict) -> dict[str, str]:
    """Each contender of test_page_cost.py, said in a headline's words."""
    return {
        "write() + drop": "write() and drop at once",
        next((n for n in e["contenders"] if n.startswith("write_many(")), ""): (
            f"write_many() of {e['many']:,} and drop"
        ),
        "drop of live pages": f"the drop alone, {e['drop_pages']:,} live pages",
    }


def page_cost_section(data: dict, out: list[str]) -> None:
    groups = groups_of(data, "page_cost")
    if not groups:
        return
    out.append("\n## What a small packed page costs\n\n")
    out.append(
        "4 KiB pages (slots of a segment file), per page, against a plain Python loop that"
        " `os.pwrite`s the page into a reused offset of a preallocated file (the least a Python"
        " program pays to put a page into a slot). The drops: clearing a list of live pages (or"
        " of as many plain objects), only the clear timed; the pages' removal runs on"
        " diskpages' own thread.\n\n"
    )
    for g in groups:
        e = g["extra_info"]
        rows = [
            [name, fmt_time(s["median_s"]), fmt_ratio((s["ratio"], s["ratio_iqr"])), f"{s['per_round']:,}"]
            for name, s in e["contenders"].items()
        ]
        out.append(table(["contender", "per page", f"÷ {e['baseline']}", "pages a round"], rows))


def page_cost_headlines(data: dict) -> list[str]:
    lines = []
    for g in groups_of(data, "page_cost"):
        e = g["extra_info"]
        for name, what in _what(e).items():
            s = e["contenders"].get(name)
            if s is not None:
                ratio = fmt_ratio((s["ratio"], s["ratio_iqr"]))
                lines.append(
                    f"a 4 KiB packed page, {what}: {fmt_time(s['median_s'])} a page,"
                    f" ÷ Python pwrite into a reused offset {ratio}"
                )
    return lines
