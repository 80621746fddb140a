"""The C core under ThreadSanitizer and AddressSanitizer+UBSan: tests/c/stress.c drives
writes, releases from other threads, drops and flushes at once while the reaper drains.
Also runnable by hand: see the command in README.md, "Checking the C"."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# the C core without pageobj.c, the Python type (it needs Python.h; stress.c is plain C)
C_CORE = sorted(p for p in CSRC.glob("*.c") if p.name != "pageobj.c")

SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address+undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.skipif(not CSRC.is_dir(), reason="needs the source tree (csrc/)")
@pytest.mark.parametrize("remover", ["auto", "loop", "packed"])
@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_c_core_under_sanitizer(tmp_path, sanitizer, remover):
    exe = tmp_path / "stress"
    cmd = [
        "gcc",
        "-std=gnu11",
        "-O1",
        "-g",
        "-Wall",
        "-Wextra",
        "-Werror",
        *SANITIZERS[sanitizer],
        f"-I{CSRC}",
        *map(str, C_CORE),
        str(ROOT / "tests/c/stress.c"),
        "-o",
        str(exe),
        "-lpthread",
    ]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0 and "sanitize" in built.stderr and "cannot find" in built.stderr:
        pytest.skip(f"the {sanitizer} sanitizer runtime is not installed")
    assert built.returncode == 0, built.stderr
    folder = tmp_path / "pages"
    folder.mkdir()
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=1")
    if remover == "loop":
        env["DP_LOOP"] = "1"
    if remover == "packed":  # pages up to 4 KiB are slots, the rest files: both at once
        env["DP_PACK"] = "1"
    run = subprocess.run([str(exe), str(folder)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok: 5400 pages written")
    assert "WARNING" not in run.stderr and "ERROR" not in run.stderr, run.stderr
