"""python -m diskpages ls / sweep, and the installed diskpages command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_processes import Holder, killed_caches

from conftest import files_in


def cli(*args, root=None):
    extra = ["--root", str(root)] if root is not None else []
    return subprocess.run(
        [sys.executable, "-m", "diskpages", *args, *extra], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def two_folders(root, packing):
    """One live cache (another process) and one orphaned folder (a killed process), whose
    pages are files, or packed (``ls`` counts the slots their segments' tags name)."""
    holder = Holder(root)
    (dead,) = killed_caches(root, caches=1, n=5)  # 5 pages of 4 KiB
    yield holder, dead
    holder.stop()


def test_ls_shows_owner_state_pages_bytes_and_age(root, two_folders):
    holder, dead = two_folders
    proc = cli("ls", root=root)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    by_name = {line.split()[0]: line for line in lines}
    live = by_name[Path(holder.path).name]
    orphan = by_name[Path(dead).name]
    assert f"pid {holder.proc.pid}" in live and "alive" in live and " 1 pages" in live and "4 B" in live
    assert "orphaned" in orphan and " 5 pages" in orphan and "20.0 KiB" in orphan
    assert "age " in live and live.rstrip().endswith("s")
    assert os.path.exists(dead)  # ls removes nothing


def test_sweep_dry_run_then_sweep(root, two_folders):
    holder, dead = two_folders
    dry = cli("sweep", "--dry-run", root=root)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {dead} (5 pages, 20.0 KiB)" in dry.stdout
    assert "would remove 1 orphaned folders, 20.0 KiB" in dry.stdout
    assert os.path.exists(dead)
    real = cli("sweep", root=root)
    assert real.returncode == 0, real.stderr
    assert f"removed {dead}" in real.stdout and "removed 1 orphaned folders, 20.0 KiB" in real.stdout
    assert not os.path.exists(dead) and os.path.exists(holder.path)
    again = cli("sweep", root=root)
    assert again.returncode == 0 and "removed 0 orphaned folders, 0 B" in again.stdout


def test_sweep_failure_exits_1_with_a_line_on_stderr(root):
    (dead,) = killed_caches(root, caches=1, n=1)
    os.mkdir(os.path.join(dead, "intruder"))
    proc = cli("sweep", root=root)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and dead in proc.stderr
    shutil.rmtree(dead)


def test_help_usage_and_failure_exit_codes(root, tmp_path):
    for args in (["--help"], ["ls", "--help"], ["sweep", "--help"]):
        proc = cli(*args)
        assert proc.returncode == 0 and "usage: diskpages" in proc.stdout, args
    for args in ([], ["bogus"], ["ls", "--nope"], ["sweep", "--root"]):
        proc = cli(*args)
        assert proc.returncode == 2 and "usage:" in proc.stderr, args
    os.symlink(tmp_path, root)
    proc = cli("ls", root=root)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("diskpages: ") and proc.stderr.count("\n") == 1
    assert "symbolic link" in proc.stderr


def test_ls_of_an_empty_or_missing_root(root):
    proc = cli("ls", root=root)
    assert proc.returncode == 0 and "no cache folders" in proc.stdout
    assert files_in(root) == []  # ls never creates the root


def test_sweep_of_a_missing_root_fails_naming_it(root):
    # A typo in --root must not look like a sweep that found nothing
    for args in (["sweep"], ["sweep", "--dry-run"]):
        proc = cli(*args, root=root)
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout
        assert proc.stderr.startswith("diskpages: ") and proc.stderr.count("\n") == 1
        assert str(root) in proc.stderr and "no such folder" in proc.stderr
    assert not root.exists()  # sweep never creates the root


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "diskpages"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (not installed by pip here)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sweep" in proc.stdout


def test_ls_and_sweep_pass_over_a_folder_only_named_like_a_cache_folder(root):
    from test_processes import lookalikes_of

    (dead,) = killed_caches(root, caches=1, n=1)
    mine = lookalikes_of(dead)
    ls = cli("ls", root=root)
    assert ls.returncode == 0 and len(ls.stdout.splitlines()) == 1, ls.stdout
    assert ls.stdout.startswith(Path(dead).name + " ")
    dry = cli("sweep", "--dry-run", root=root)
    assert dry.returncode == 0 and "would remove 1 orphaned folders" in dry.stdout, dry.stdout
    real = cli("sweep", root=root)
    assert real.returncode == 0 and "removed 1 orphaned folders" in real.stdout, real.stdout
    assert not os.path.exists(dead)
    for path in mine:
        assert (path / "1.page").read_bytes() == b"mine", path


def test_ls_finds_dask_workers_caches_under_dasks_temporary_directory(tmp_path, monkeypatch):
    """A dask worker's spill cache (diskpages.dask) is under <worker>/storage, not the
    default root: ``ls`` lists those of dask's temporary directory after the root, and
    ``--dask DIR`` those of a cluster started with local_directory=DIR."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("DISKPAGES_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("DASK_TEMPORARY_DIRECTORY", raising=False)
    storage = tmp_path / "dask-scratch-space" / "worker-abc123" / "storage"
    elsewhere = tmp_path / "cluster" / "dask-scratch-space" / "worker-def456" / "storage"
    for folder in (storage, elsewhere):
        folder.mkdir(mode=0o700, parents=True)
    (storage.parent.parent / "worker-xyz789" / "storage").mkdir(parents=True)  # distributed's own
    holders = [Holder(storage), Holder(elsewhere)]
    try:
        proc = cli("ls")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.splitlines()[0] == f"dask worker {storage.parent}:"
        assert proc.stdout.splitlines()[1].startswith("  " + Path(holders[0].path).name)
        assert " alive " in proc.stdout and len(proc.stdout.splitlines()) == 2
        proc = cli("ls", "--dask", str(tmp_path / "cluster"))
        assert proc.returncode == 0 and proc.stdout.splitlines() == [
            f"dask worker {elsewhere.parent}:",
            proc.stdout.splitlines()[1],
        ]
        assert Path(holders[1].path).name in proc.stdout
        proc = cli("ls", root=tmp_path / "root")  # --root: that root only
        assert proc.returncode == 0 and proc.stdout == f"no cache folders under {tmp_path / 'root'}\n"
    finally:
        for holder in holders:
            holder.stop()
    proc = cli("ls", "--dask", str(tmp_path))
    assert proc.stdout == f"no dask worker's cache folders under {tmp_path}\n"
    assert cli("ls", "--dask", str(tmp_path), "--root", str(tmp_path)).returncode == 2
