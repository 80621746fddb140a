import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diskpages import PageCache


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def cache(root: Path):
    # a long max_delay: tests that look at pending pages must not race the reaper
    with PageCache(root, max_delay=30.0) as c:
        yield c


@pytest.fixture
def no_gc():
    """Automatic collections off for the test (from a clean heap), so that cycles are
    collected exactly where the test says."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 60, preexec_fn=None
) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with the installed diskpages; capture everything."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        preexec_fn=preexec_fn,
    )


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.002) -> bool:
    """Poll until predicate() is true; a liveness bound, not a timing measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []
