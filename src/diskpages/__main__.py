"""The command line (``python -m diskpages``, or ``diskpages``): it lists or sweeps cache folders.

    diskpages ls [--root DIR | --dask DIR]
    diskpages sweep [--root DIR] [--dry-run]

``ls`` with no option lists the default root and, after it, the spill caches of dask
workers (``diskpages.dask``) under dask's temporary directory.

Exit status: 0 on success, 2 on bad usage, 1 on failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._folders import FolderInfo, default_root, list_folders, resolve_root, sweep_folders
from .errors import PageCacheError


def human(nbytes: int) -> str:
    """4 B, 20.0 KiB, 1.5 GiB."""
    size, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def age(seconds: float) -> str:
    """12s, 5m03s, 2h05m, 3d04h: the two largest units."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def describe(info: FolderInfo, now: float) -> str:
    state = "alive" if info.alive else "orphaned"
    return (
        f"{info.path.name}  pid {info.pid:<7} {state:<8} {info.pages:>7} pages "
        f"{human(info.nbytes):>10}  age {age(now - info.created)}"
    )


def dask_directory() -> Path:
    """Where dask workers make their folders by default: dask's ``temporary-directory``
    setting (when dask is installed), else Python's temporary folder."""
    try:
        import dask.config
    except ImportError:
        configured = None
    else:
        configured = dask.config.get("temporary-directory", None)
    return Path(configured or tempfile.gettempdir())


def dask_storage(directory: Path) -> Iterator[Path]:
    """The spill folders (``<worker>/storage``) of dask workers under ``directory``: a
    cluster's ``local_directory``, its ``dask-scratch-space`` folder, or one worker's."""
    patterns = ("storage", "worker-*/storage", "dask-scratch-space*/worker-*/storage")
    for pattern in patterns:
        yield from sorted(p for p in directory.glob(pattern) if p.is_dir() and not p.is_symlink())


def cmd_ls(args: argparse.Namespace) -> int:
    now = time.time()
    if args.dask is None:
        folders = list_folders(args.root)
        for info in folders:
            print(describe(info, now))
        if args.root is not None:
            if not folders:
                print(f"no cache folders under {args.root}")
            return 0
    searched = Path(args.dask) if args.dask is not None else dask_directory()
    found = 0
    for storage in dask_storage(searched):
        try:
            workers = list_folders(storage)
        except (OSError, PageCacheError):  # not ours to look into (distributed's own spill)
            continue
        if workers:
            print(f"dask worker {storage.parent}:")
        for info in workers:
            print("  " + describe(info, now))
        found += len(workers)
    if args.dask is not None and not found:
        print(f"no dask worker's cache folders under {searched}")
    elif args.dask is None and not folders and not found:
        print(f"no cache folders under {default_root()}, nor dask workers' under {searched}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.root is not None and not os.path.lexists(args.root):
        # a typo must not pass for a sweep that found nothing (a missing default root is
        # fine: no cache ever ran here)
        print(
            f"diskpages: no such folder {resolve_root(args.root)}: nothing swept; check --root",
            file=sys.stderr,
        )
        return 1
    result = sweep_folders(args.root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for info in result.removed:
        print(f"{verb} {info.path} ({info.pages} pages, {human(info.nbytes)})")
    freed = sum(info.nbytes for info in result.removed)
    print(f"{verb} {len(result.removed)} orphaned folders, {human(freed)}")
    for info, error in result.failed:
        print(f"diskpages: could not remove {info.path}: {error}", file=sys.stderr)
    return 1 if result.failed else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="diskpages",
        description="See and clean the cache folders of diskpages (one per PageCache).",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="{ls,sweep}")
    root_help = "the root folder (default: $DISKPAGES_ROOT or <tempdir>/diskpages-<uid>)"

    ls = sub.add_parser(
        "ls",
        help="list cache folders: owner pid, alive or orphaned, pages, bytes, age",
        description="List the cache folders under the root, then those of dask workers' "
        "spill buffers (diskpages.dask) under dask's temporary directory. --root lists only "
        "that root; --dask only the workers under DIR.",
    )
    where = ls.add_mutually_exclusive_group()
    where.add_argument("--root", metavar="DIR", help=root_help)
    where.add_argument(
        "--dask",
        metavar="DIR",
        help="a dask cluster's local_directory (or its dask-scratch-space, or one worker's "
        "folder): list its workers' spill caches (default: dask's temporary-directory)",
    )
    ls.set_defaults(run=cmd_ls)

    sw = sub.add_parser(
        "sweep",
        help="remove the folders of processes that died (never a live cache's)",
        description="Remove the cache folders whose lock no process holds: those of killed "
        "or crashed processes. A live cache's folder is never touched.",
    )
    sw.add_argument("--root", metavar="DIR", help=root_help)
    sw.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    sw.set_defaults(run=cmd_sweep)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on bad usage
    try:
        status: int = args.run(args)  # the subcommand's cmd_*() function
        return status
    except (OSError, PageCacheError) as e:
        print(f"diskpages: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
