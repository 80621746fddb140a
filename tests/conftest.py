import gc
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import diskpages
from diskpages import PageCache, _folders
from diskpages import _bindings as native

PACKAGE = str(Path(diskpages.__file__).resolve().parent)


class Interrupt(BaseException):
    """What interrupted_at's tracer raises: a BaseException, like KeyboardInterrupt."""


def interrupted_at(call, k: int):
    """call(), with Interrupt raised at the k-th opcode executed in diskpages' own code:
    (its result, None), or (None, the exception it raised). Not in diskpages' gc callback
    or its finalizers, which run whenever a collection does (and let no exception out)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE) or code.co_name in ("_on_collection", "__del__"):
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
            if count == k:
                raise Interrupt
        return tracer

    sys.settrace(tracer)
    try:
        return call(), None
    except BaseException as e:  # noqa: B036 - whatever it is, the caller looks at it
        return None, e
    finally:
        sys.settrace(None)


class HeldCollection:
    """A cycle collection that another thread runs and holds open: one of its finalizers
    waits until ``end()``. ``start()`` returns once it is inside the collection."""

    def __init__(self) -> None:
        self.inside, self.ended = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._collect)

    def _collect(self) -> None:
        held = self

        class Waits:
            def __del__(self):
                held.inside.set()
                held.ended.wait(30)

        w = Waits()
        w.cycle = w
        del w
        gc.collect()

    def start(self) -> None:
        self.thread.start()
        assert self.inside.wait(10), "the other thread's collection never started"

    def end(self) -> None:
        self.ended.set()
        self.thread.join()


def warm_up_tracer() -> None:
    """Trace one call and throw it away. CPython 3.12.1 delivers no "opcode" event in the
    first call a tracer sees in a process (even with f_trace_opcodes set in its "call"
    event); from the second on, every one. The per-bytecode interrupt tests call this at
    import, so that their first case interrupts where it should."""

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        return tracer

    sys.settrace(tracer)
    try:
        textwrap.dedent("x")
    finally:
        sys.settrace(None)


@pytest.fixture(params=["files", "packed"])
def packing(request, monkeypatch):
    """Run the test twice: with a file per page (DISKPAGES_PACK_MAX=0) and with small pages
    packed as slots in segment files (the default pack_max). Through the environment, so
    that every cache the test makes, and those of the processes it starts, follow it. Its
    value says which run this is. Tests about the guarantees of README.md's "Lifetimes" and
    "Across processes" use it: they hold for both kinds of page."""
    if request.param == "files":
        monkeypatch.setenv("DISKPAGES_PACK_MAX", "0")
    else:
        monkeypatch.delenv("DISKPAGES_PACK_MAX", raising=False)
    return request.param


#: For a test in a module that uses ``packing`` throughout but is about files (O_TMPFILE,
#: linkat, unlinkat...): run it once, with a file per page (DISKPAGES_PACK_MAX=0).
files_only = pytest.mark.parametrize("packing", ["files"], indirect=True)
#: For a test in such a module that packing changes nothing in (no page, or only pages
#: that always have files), or too slow to run twice for what it would gain: run it once,
#: with the default pack_max.
packing_irrelevant = pytest.mark.parametrize("packing", ["packed"], indirect=True)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def cache(request, root: Path):
    if "packing" in request.fixturenames:
        request.getfixturevalue("packing")  # the environment first, whatever the order
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


def page_count_on_disk(where) -> int:
    """How many pages a cache's folder holds (a PageCache or a folder's path), as
    ``diskpages ls`` counts them: files named *.page plus the slots of segments whose tag
    holds a page. 0 for a folder that is gone."""
    return pages_and_bytes_on_disk(where)[0]


def pages_and_bytes_on_disk(where) -> tuple[int, int]:
    """(pages, bytes) as ``diskpages ls`` counts them (see page_count_on_disk); the bytes
    are those of every file of the folder, segments' slots counted by their pages' sizes."""
    path = where.path if isinstance(where, PageCache) else Path(where)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, 0
    try:
        return _folders._contents(fd)
    finally:
        os.close(fd)


def page_files_on_disk(where) -> set[str]:
    """The names of the page files in a cache's folder (a PageCache or a path): every file
    but the segments of packed pages."""
    path = where.path if isinstance(where, PageCache) else Path(where)
    return {n for n in files_in(path) if not n.endswith(".slots")}


def slot_ids_on_disk(where) -> set[int]:
    """The ids of the packed pages in a cache's folder (a PageCache or a path): those its
    segments' tags name (csrc/diskpages.h, dp_tag). Fails if two slots name one page."""
    path = where.path if isinstance(where, PageCache) else Path(where)
    ids: set[int] = set()
    for segment in path.glob("*.slots"):
        slot_size = int(segment.name.removesuffix(".slots"))
        with open(segment, "rb") as f:
            slots = max(0, os.fstat(f.fileno()).st_size - native.TAGS_BYTES) // slot_size
            tags = f.read(slots * native.TAG_BYTES)
        for page_id, _, _, _ in struct.iter_unpack("<QQQQ", tags):
            if page_id:
                assert page_id not in ids, f"two slots of {path} are tagged with page {page_id}"
                ids.add(page_id)
    return ids


def segment_count(where) -> int:
    """How many segment files (of packed pages) a cache's folder holds."""
    path = where.path if isinstance(where, PageCache) else Path(where)
    return sum(1 for n in files_in(path) if n.endswith(".slots"))


class OnDisk:
    """Where a page's bytes are on disk, taken while the page is alive (not released):
    its own file, or its slot in a segment file. ``exists()`` says whether they are still
    there, for a file page as ``path.exists()`` does, for a packed page by the slot's tag
    (it names the page while the slot holds it: 0 once freed, another page's id once
    reused; see csrc/diskpages.h). It keeps nothing alive and works after the page, its
    cache or its folder is gone."""

    def __init__(self, page) -> None:
        slot = native.page_slot(page._hold)
        self.id, self.nbytes = page.id, page.nbytes
        if slot is None:
            self.path, self.slot = page.path, None
        else:
            self.path, self.slot = page.cache.path / native.segment_name(slot[0]), slot[1]

    def exists(self) -> bool:
        if self.slot is None:
            return self.path.exists()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.slot * native.TAG_BYTES)
                tag = f.read(16)
        except FileNotFoundError:
            return False
        return len(tag) == 16 and struct.unpack("<QQ", tag) == (self.id, self.nbytes)

    def __repr__(self) -> str:
        where = f"slot {self.slot} of " if self.slot is not None else ""
        return f"<OnDisk page {self.id}: {where}{self.path}>"


def on_disk(page) -> OnDisk:
    return OnDisk(page)
