"""Shared pieces of the benchmark suite: run size, where files go, the disk's state.

Run:   python -m pytest benchmarks --benchmark-json=bench.json --benchmark-quiet
       (DISKPAGES_QUICK=1 for a short run; DISKPAGES_BENCH_SMOKE=1 runs every benchmark
       once with tiny sizes, which is what tests/test_benchmarks_smoke.py does;
       --benchmark-quiet leaves out pytest-benchmark's own tables)
Report: python benchmarks/report.py bench.json   (writes benchmarks/results/REPORT.md after
       a full run of the whole suite, else benchmarks/results/quick/REPORT.md, ignored by git)

Every group holds a baseline measured in the same run, in interleaved rounds
(harness.py); fresh and steady disk states are made alike for all contenders
(diskstate.py). The headline groups take an ``fs`` parameter and run on this disk, on a
journaled ext4 and on a tmpfs that the session mounts itself (filesystems.py;
DISKPAGES_BENCH_FS picks which).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import diskstate
import diskwrites
import filesystems
import floor as floor_module
import harness

SMOKE = os.environ.get("DISKPAGES_BENCH_SMOKE", "") not in ("", "0")
QUICK = SMOKE or os.environ.get("DISKPAGES_QUICK", "") not in ("", "0")
MODE = "smoke" if SMOKE else "quick" if QUICK else "full"
ROUNDS = 1 if SMOKE else 5 if QUICK else 12
WARMUP = 0 if SMOKE else 1
harness.DEFAULT_WARMUP = WARMUP
diskstate.Disk.write_back = not SMOKE  # a smoke run checks that code runs, not figures
STEADY_RESATURATE_S = 50  # the saturation lasts 60 s at least; renew it before then
SESSION_START = time.monotonic()
SPREAD = {"ok": None}  # whether the session root got ext4's TOPDIR flag (diskstate.py)
FILESYSTEMS = filesystems.selected(SMOKE)  # fails early on an unknown DISKPAGES_BENCH_FS name
STEADY_WARMUP = 0 if SMOKE else 3 if QUICK else 6  # extra rounds: steady off this disk (filesystems.py)


def scaled(full: int, quick: int, smoke: int = 1) -> int:
    """A count for the current run size."""
    return smoke if SMOKE else quick if QUICK else full


def pytest_collection_modifyitems(items):
    # A module's skip_reason(**params) skips a case before its fixtures run (the steady
    # state's fixture saturates a block group: seconds of work for a case to be skipped).
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        reason = getattr(item.module, "skip_reason", None)
        if "fs" in params and (why := filesystems.not_selected_reason(params["fs"], SMOKE)):
            item.add_marker(pytest.mark.skip(reason=why))
        elif (
            params.get("fs") == filesystems.TMPFS
            and params.get("state") == "steady"
            and not getattr(item.module, "STEADY_ON_TMPFS", False)
        ):
            why = (
                "tmpfs, steady: means nothing for this group: no device, no inode table and no "
                "block allocator whose history a churned folder would carry; its fresh figure stands"
            )
            item.add_marker(pytest.mark.skip(reason=why))
        elif params and reason is not None and (why := reason(**params)):
            item.add_marker(pytest.mark.skip(reason=why))

    # Fresh-state figures first, then steady state: the steady state's saturated block
    # group must not exist yet while fresh figures are taken (see diskstate.py).
    def state_of(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return 1 if params.get("state") == "steady" else 0

    items.sort(key=state_of)


def bench_base() -> Path:
    return Path(os.environ.get("DISKPAGES_BENCH_ROOT", tempfile.gettempdir())) / "diskpages-bench"


# What each test writes to the device (diskwrites.py): printed at the session's end, the
# total recorded for report.py. A smoke run counts too, without the syncs.
WRITES = diskwrites.Meter(bench_base().parent, sync=not SMOKE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = WRITES.reading()
    yield
    WRITES.charge(item.nodeid, before)


def pytest_terminal_summary(terminalreporter):
    for line in WRITES.lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def bench_root():
    """This session's folder; its subfolders are spread over the disk (diskstate.py)."""
    base = bench_base()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = base / uuid.uuid4().hex[:8]
    root.mkdir(mode=0o700)
    SPREAD["ok"] = diskstate.spread_subfolders(root)
    yield root
    diskstate.remove_tree(root)
    try:
        base.rmdir()  # nothing left in the temp folder: the base goes too, once empty
    except OSError:
        pass  # another session's folders, or images, are still in it


@pytest.fixture(scope="session")
def mounts(bench_root):
    """This disk, ext4-journal and tmpfs, the last two mounted on first use and undone at
    the session's end (filesystems.py)."""
    made = filesystems.Mounts(bench_base(), bench_root, bool(SPREAD["ok"]))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=filesystems.NAMES)
def fs(request, mounts) -> filesystems.FileSystem:
    """The file system a headline group runs on; skipped with the reason where it cannot be
    made here (not root, no loop device, no mkfs.ext4)."""
    got = mounts.get(request.param)
    if isinstance(got, str):
        pytest.skip(got)
    return got


@pytest.fixture(scope="session")
def floor():
    return floor_module.load()


@pytest.fixture(scope="session")
def inodes_per_group(bench_root):
    return diskstate.inodes_per_group(bench_root)


def fresh_dir(root: Path) -> Path:
    """A new folder under ``root`` (spread over the disk when ``root`` is bench_root)."""
    return diskstate.new_folder(root, "fresh")


class _Steady:
    parent: Path | None = None
    saturated_at = 0.0


@pytest.fixture(scope="session")
def _steady(bench_root):
    return _Steady()


@pytest.fixture
def steady_parent(_steady, bench_root, inodes_per_group):
    """The shared parent folder of every steady-state benchmark, its block group saturated
    with recently deleted inodes (diskstate.py)."""
    if _steady.parent is None:
        _steady.parent = diskstate.new_folder(bench_root, "steady")
    if time.monotonic() - _steady.saturated_at > STEADY_RESATURATE_S:
        diskstate.saturate(_steady.parent, inodes_per_group, count=300 if SMOKE else None)
        _steady.saturated_at = time.monotonic()
    return _steady.parent


@pytest.fixture(params=["fresh", "steady"])
def state(request):
    return request.param


@pytest.fixture
def disk(request, state, bench_root) -> diskstate.Disk:
    """Where the benchmark's contenders make their folders, and its rounds' before_round,
    for its disk state (diskstate.py). Dirty data of earlier benchmarks is written back
    first, so that no benchmark pays for another's writeback."""
    if diskstate.Disk.write_back:
        os.sync()
    where = request.getfixturevalue("fs") if "fs" in request.fixturenames else None
    if where is None or where.name == filesystems.THISDISK:
        if state == "steady":
            return diskstate.Disk("steady", bench_root, request.getfixturevalue("steady_parent"))
        return diskstate.Disk("fresh", bench_root)
    if state == "fresh":
        return diskstate.Disk("fresh", where.root, fs=where.name)
    # steady without the one-second rule: a long-lived shared parent, and the group's own
    # workload run for a while there first (filesystems.py)
    if where.steady_parent is None:
        where.steady_parent = diskstate.new_folder(where.root, "steady")
    return diskstate.Disk(
        "steady",
        where.root,
        where.steady_parent,
        fs=where.name,
        one_second_rule=False,
        warmup=WARMUP + STEADY_WARMUP,
    )


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _whole_suite(config) -> bool:
    """Whether the session ran every benchmark (no -k, -m, --deselect, --lf, no single
    file or test): only such a run, in full mode, replaces the committed report (report.py)."""
    opt = config.option
    if opt.keyword or opt.markexpr or getattr(opt, "deselect", None) or getattr(opt, "lf", False):
        return False
    here = Path(__file__).resolve().parent
    return all((config.invocation_params.dir / arg).resolve() == here for arg in config.args)


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the report states about the run: machine, disk, Python, command, code."""
    import diskpages

    env = {k: v for k, v in os.environ.items() if k.startswith("DISKPAGES_")}
    command = " ".join([*(f"{k}={v}" for k, v in sorted(env.items())), "python -m pytest"])
    command += " " + shlex.join(sys.argv[1:])
    base = bench_base()
    made = not base.exists()  # (at the end of a run the session removed it already)
    base.mkdir(parents=True, exist_ok=True)
    try:
        filesystem = diskstate.filesystem_info(base)
    finally:
        if made:
            base.rmdir()
    machine_info["diskpages_bench"] = {
        "mode": MODE,
        "whole_suite": _whole_suite(config),
        "rounds": ROUNDS,
        "command": command,
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bench_root": str(base),
        "filesystem": filesystem,
        "folders_spread": SPREAD["ok"],
        "filesystems": {
            name: filesystems.INFO.get(name, {"skipped": "not used"}) for name in filesystems.NAMES
        },
        "filesystems_selected": FILESYSTEMS,
        "steady_warmup_rounds": STEADY_WARMUP,
        "diskpages_version": diskpages.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "elapsed_s": time.monotonic() - SESSION_START,
        "written_bytes": WRITES.total(),
        "written_bytes_per_test": WRITES.per_test,
    }
