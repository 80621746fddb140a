"""The report's plots (PNG, matplotlib's Agg backend), drawn beside REPORT.md."""

from __future__ import annotations

from pathlib import Path

from report_format import (
    CHURN_SIZES,
    DISKPAGES_WRITES,
    FS_LABEL,
    SIZE_ORDER,
    STATES,
    SYNC_ORDER,
    filesystems_in,
    find,
    find_write,
    fs_of,
    groups_of,
)


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
