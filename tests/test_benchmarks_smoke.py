"""The benchmark suite still runs: every benchmark once, with tiny sizes, so that a broken
benchmark fails here rather than in the next full run; then the report tool on its output.
No timing is checked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("pytest_benchmark") is None,
        reason="pytest-benchmark is not installed (pip install '.[test]')",
    ),
    pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"no benchmarks/ folder at {BENCHMARKS}"),
]


def test_every_benchmark_runs_once_and_the_report_renders(tmp_path: Path):
    env = dict(os.environ, DISKPAGES_BENCH_SMOKE="1", DISKPAGES_BENCH_ROOT=str(tmp_path / "root"))
    env.pop("DISKPAGES_QUICK", None)
    result_json = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(BENCHMARKS),
            "-q",
            "-x",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--benchmark-json={result_json}",
            "--benchmark-quiet",  # as README's command: progress, not pytest-benchmark's tables
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, output
    assert " passed" in run.stdout and " error" not in run.stdout, output
    # progress and skip reasons, not pytest-benchmark's tables ("benchmark 'group': N tests")
    assert "benchmark '" not in run.stdout and "Legend:" not in run.stdout, output
    assert json.loads(result_json.read_text())["machine_info"]["diskpages_bench"]["whole_suite"] is True

    report = subprocess.run(
        [sys.executable, str(BENCHMARKS / "report.py"), str(result_json), "--out", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    # a short summary: headline ratios and where the report is, not the tables
    assert len(report.stdout.splitlines()) < 20, report.stdout
    assert report.stdout.rstrip().endswith(str(tmp_path / "results" / "REPORT.md")), report.stdout
    assert "÷ C floor" in report.stdout, report.stdout
    text = (tmp_path / "results" / "REPORT.md").read_text()
    for heading in (
        "# diskpages benchmark report",
        "## Writes",
        "## Cleanup",
        "## gc pause",
        "## What a small packed page costs",
        "## Every group",
    ):
        assert heading in text


def test_only_a_full_run_of_the_whole_suite_reports_into_the_committed_folder():
    spec = importlib.util.spec_from_file_location("bench_report", BENCHMARKS / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def run(**info):
        return {"machine_info": {"diskpages_bench": info}}

    committed, ignored = BENCHMARKS / "results", BENCHMARKS / "results" / "quick"
    assert report.default_out(run(mode="full", whole_suite=True)) == committed
    assert report.default_out(run(mode="full")) == committed  # a run from before whole_suite
    assert report.default_out(run(mode="full", whole_suite=False)) == ignored  # -k, one file
    assert report.default_out(run(mode="quick", whole_suite=True)) == ignored
    assert report.default_out(run(mode="smoke", whole_suite=True)) == ignored
    assert report.default_out({"benchmarks": []}) == ignored
    ignore = subprocess.run(
        ["git", "check-ignore", "-q", str(ignored / "REPORT.md")], cwd=BENCHMARKS, capture_output=True
    )
    if ignore.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignore.returncode == 0, f"{ignored} is not ignored by git"
