"""Shared pieces of the benchmark suite: where files go, the C floor, run order, sizes.

Run: python -m pytest benchmarks   (DISKPAGES_QUICK=1 for a short run)
Every group holds a baseline measured in the same run; benchmarks/summary.py prints each
contender's median as a ratio to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

import floor as floor_module

QUICK = os.environ.get("DISKPAGES_QUICK", "") not in ("", "0")
ROUNDS = 5 if QUICK else 12


def pytest_collection_modifyitems(items):
    # Fresh-folder figures first, then the churn, then steady-state figures: creates right
    # after many deletions are slower on this machine's journal-less ext4, and that history
    # must not leak into the fresh figures.
    def state_of(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return 1 if params.get("state") == "steady" else 0

    items.sort(key=state_of)


@pytest.fixture(scope="session")
def bench_root():
    base = Path(os.environ.get("DISKPAGES_BENCH_ROOT", tempfile.gettempdir())) / "diskpages-bench"
    base.mkdir(parents=True, exist_ok=True)
    root = base / uuid.uuid4().hex[:8]
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def floor():
    return floor_module.load()


@pytest.fixture(scope="session")
def churned(bench_root):
    """Tens of thousands of create-and-drop cycles, so what follows runs in steady state."""
    from diskpages import PageCache

    n = 10_000 if QUICK else 40_000
    with PageCache(bench_root, batch=256) as cache:
        data = b"c" * 4096
        for _ in range(n // 100):
            pages = cache.write_many([data] * 100)
            del pages
        cache.flush()
    return n


def fresh_dir(root: Path) -> Path:
    d = root / f"fresh-{uuid.uuid4().hex[:10]}"
    d.mkdir()
    return d
