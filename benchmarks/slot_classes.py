"""What packed pages take on disk against files of their own, for several mixes of page
sizes: the measurement behind the slot classes (csrc/pack.c, SLOT_SIZES).

    python benchmarks/slot_classes.py [--pages 4000] [--root DIR]

For each mix it writes the pages into a fresh cache (the default pack_max), keeps them
alive, and prints what ``du`` sees of the cache's folder against what the same pages take
as files (their whole 4 KiB blocks, as distributed's spill files or a file per page
would), and how many segments (size classes) the mix used: each holds up to one growth
chunk (1 MiB) ahead of its slots. Run it against two builds (PYTHONPATH) to compare.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile

from diskpages import PageCache

KiB = 1024


def mixes(pages: int) -> dict[str, list[int]]:
    rnd = random.Random(1)
    return {
        "205 KB, a dask worker's chunks": [205_000 + rnd.randint(0, 300) for _ in range(pages)],
        "150-250 KB uniform": [rnd.randint(150_000, 250_000) for _ in range(pages)],
        "lognormal around 64 KB": [
            min(256 * KiB, int(rnd.lognormvariate(math.log(64_000), 0.8))) for _ in range(pages)
        ],
        "1 B to 256 KiB uniform": [rnd.randint(1, 256 * KiB) for _ in range(pages)],
    }


def du(folder: str) -> int:
    total = os.stat(folder).st_blocks * 512
    for entry in os.scandir(folder):
        total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4000)
    parser.add_argument("--root", default=None, help="where the caches go (default: a temp folder)")
    args = parser.parse_args()
    temp = tempfile.TemporaryDirectory(prefix="slot-classes-") if args.root is None else None
    root = args.root or temp.name  # type: ignore[union-attr]
    for name, sizes in mixes(args.pages).items():
        with PageCache(root) as cache:
            pages = [cache.write(b"\1" * n) for n in sizes]
            on_disk = du(str(cache.path))
            segments = sum(e.name.endswith(".slots") for e in os.scandir(cache.path))
            as_files = sum(max(4096, -(-n // 4096) * 4096) for n in sizes)
            print(
                f"{name:>32}: {on_disk / 2**20:8.1f} MiB packed, {as_files / 2**20:8.1f} MiB as files, "
                f"ratio {on_disk / as_files:.3f}, {segments} segments"
            )
            del pages
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
