"""What the kernel sees, proved with strace: the release path makes no system call (for
page files and packed pages alike), removal goes through io_uring in batches (or a plain
unlinkat loop when asked), freeing packed pages unlinks nothing, and each sync mode makes
the calls it promises."""

import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")

SCRIPT = """
    import os
    from diskpages import PageCache

    def mark(name):  # a failing stat that strace shows: the test's bookmarks
        try:
            os.stat("/__dp_" + name + "__")
        except OSError:
            pass

    c = PageCache({root!r}, max_delay=60, batch=100000, pack_max={pack_max})
    explicit = c.write_many([b"x" * 4096] * {n})
    dropped = [c.write(b"y" * 4096) for _ in range({n})]
    mark("begin_release")
    for p in explicit:
        p.release()
    mark("end_release")
    mark("begin_drop")
    del dropped
    mark("end_drop")
    del explicit
    mark("begin_flush")
    print(c.remove_released(), c.stats().remover)
    mark("end_flush")
    c.close()
"""


def trace(
    tmp_path: Path, n: int, env: dict[str, str] | None = None, pack_max: int | None = 0
) -> tuple[list[str], str]:
    """strace of SCRIPT: n pages released, n dropped, then flushed. pack_max=0: page files
    (the default here: most of these tests are about removing files); None: the
    default pack_max, 4 KiB pages packed."""
    out = tmp_path / "strace.out"
    script = textwrap.dedent(SCRIPT.format(root=str(tmp_path / "root"), n=n, pack_max=pack_max))
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(out), sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return out.read_text().splitlines(), proc.stdout


def calls(lines: list[str], begin: str, end: str, main_only: bool = True) -> Counter:
    """System calls between two bookmarks; by the main thread only, or by every thread."""
    main = lines[0].split()[0]
    seen: Counter = Counter()
    inside = False
    for line in lines:
        if f"__dp_{begin}__" in line:
            inside = True
            continue
        if f"__dp_{end}__" in line:
            inside = False
            continue
        pid, rest = line.split(None, 1)
        if not inside or "resumed>" in rest or rest.startswith("+++"):
            continue
        if main_only and pid != main:
            continue
        seen[re.split(r"[ (]", rest)[0]] += 1
    return seen


@pytest.mark.parametrize("pack_max", [0, None], ids=["files", "packed"])
def test_release_and_drop_make_no_system_call(tmp_path, pack_max):
    lines, _ = trace(tmp_path, 2000, pack_max=pack_max)
    assert calls(lines, "begin_release", "end_release") == Counter()
    assert calls(lines, "begin_drop", "end_drop") == Counter()


def test_remove_released_removes_through_io_uring_in_batches(tmp_path):
    import os

    # io_uring for every batch: "auto" chooses per batch by timing its first unlink
    lines, stdout = trace(tmp_path, 1000, env=dict(os.environ, DISKPAGES_REMOVER="io_uring"))
    removed, remover = stdout.split()
    assert int(removed) == 2000
    if remover != "io_uring":
        pytest.skip("io_uring is unavailable here; the loop fallback is tested below")
    during = calls(lines, "begin_flush", "end_flush", main_only=False)
    assert during["unlinkat"] == 0 and during["unlink"] == 0
    # 2000 removals, 64 per ring round: batched, not one system call per file
    assert 2000 / 64 <= during["io_uring_enter"] <= 2000 / 64 + 4


def test_freeing_packed_pages_removes_no_file(tmp_path):
    lines, stdout = trace(tmp_path, 1000, pack_max=None)
    removed, _ = stdout.split()
    assert int(removed) == 2000  # freed slots count as removed
    during = calls(lines, "begin_flush", "end_flush", main_only=False)
    assert during["unlinkat"] == 0 and during["unlink"] == 0 and during["io_uring_enter"] == 0
    # (the reaper may give the freed slots' blocks back: in runs, never a call per slot)
    assert during["fallocate"] <= 8, during


def test_loop_fallback_uses_unlinkat(tmp_path):
    import os

    env = dict(os.environ, DISKPAGES_REMOVER="loop")
    lines, stdout = trace(tmp_path, 300, env=env)
    removed, remover = stdout.split()
    assert (int(removed), remover) == (600, "loop")
    during = calls(lines, "begin_flush", "end_flush", main_only=False)
    assert during["unlinkat"] == 600
    assert during["io_uring_enter"] == 0


SYNC_SCRIPT = """
    import os
    from diskpages import PageCache

    def mark(name):
        try:
            os.stat("/__dp_" + name + "__")
        except OSError:
            pass

    c = PageCache({root!r}, sync={sync!r}, pack_max={pack_max})
    mark("begin_write")
    pages = [c.write(b"w" * 5000) for _ in range(3)]
    mark("end_write")
    mark("begin_many")
    pages += c.write_many([b"m" * 5000] * 4)
    mark("end_many")
    mark("begin_seal")
    b = c.allocate(5000)
    b.view()[:1] = b"a"
    pages.append(b.seal())
    mark("end_seal")
    c.close()
"""


@pytest.mark.parametrize(
    "pack_max, sync, write, many, seal",
    [
        # per mode: the sync calls of 3 write()s, of one write_many() of 4, of one seal()
        # a file per page: each page file is synced, and under "full" the folder with it
        (0, "none", {}, {}, {}),
        (0, "data", {"fdatasync": 3}, {"fdatasync": 4}, {"msync": 1}),
        (0, "full", {"fdatasync": 3, "fsync": 3}, {"fdatasync": 4, "fsync": 1}, {"msync": 1, "fsync": 1}),
        # packed (the 5000-byte pages; a builder still makes a file): the segment is synced
        # once per write() or write_many() call; under "full" the folder only when a
        # segment is made (the first write) or a page file is (the seal)
        (None, "none", {}, {}, {}),
        (None, "data", {"fdatasync": 3}, {"fdatasync": 1}, {"msync": 1}),
        (None, "full", {"fdatasync": 3, "fsync": 1}, {"fdatasync": 1}, {"msync": 1, "fsync": 1}),
    ],
    ids=["files-none", "files-data", "files-full", "packed-none", "packed-data", "packed-full"],
)
def test_sync_modes_make_the_promised_calls(tmp_path, pack_max, sync, write, many, seal):
    out = tmp_path / "strace.out"
    script = textwrap.dedent(SYNC_SCRIPT.format(root=str(tmp_path / "root"), sync=sync, pack_max=pack_max))
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fdatasync,fsync,msync,sync_file_range,newfstatat,stat",
            "-o",
            str(out),
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()

    def syncs(begin, end):
        seen = calls(lines, begin, end, main_only=False)
        return {k: v for k, v in seen.items() if k in ("fdatasync", "fsync", "msync", "sync_file_range")}

    assert syncs("begin_write", "end_write") == write
    assert syncs("begin_many", "end_many") == many
    assert syncs("begin_seal", "end_seal") == seal
