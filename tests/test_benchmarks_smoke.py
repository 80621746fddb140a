"""The benchmark suite still runs: every benchmark once, with tiny sizes, so that a broken
benchmark fails here rather than in the next full run; then the report tool on its output.
No timing is checked."""

from __future__ import annotations

import importlib.util
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

    report = subprocess.run(
        [sys.executable, str(BENCHMARKS / "report.py"), str(result_json), "--out", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    text = (tmp_path / "results" / "REPORT.md").read_text()
    for heading in (
        "# diskpages benchmark report",
        "## Writes",
        "## Cleanup",
        "## gc pause",
        "## Every group",
    ):
        assert heading in text
