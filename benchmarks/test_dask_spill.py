"""diskpages.dask.SpillBuffer against distributed's own SpillBuffer, as a dask worker uses it.

Values are NumPy arrays (random float64, so a spill compressor could not shrink them) of
64 KiB, 1 MiB and 10 MiB. Contenders, in interleaved rounds (harness.py):

- ``distributed``: ``distributed.spill.SpillBuffer``, whose spill store is a ``zict.File``
  (a file per key, ``os.remove`` in the thread that deletes the key). The baseline.
- ``diskpages``: ``diskpages.dask.SpillBuffer`` with its defaults: a spilled value up to
  PACK_MAX (256 KiB) is a slot in a shared segment file, a bigger one a file of its own.
- ``diskpages pack_max=0``: the same with a file for every value, so the report can tell
  what packing changes (at 1 MiB and 10 MiB both are the same code path: a control).
- ``dict store (floor)``: distributed's SpillBuffer with a plain dict where its File was:
  the same zict layers and serialization with no storage at all. What no store can beat.

Groups (``fs``: this disk, a journaled ext4 and a tmpfs, filesystems.py):

1. ``test_spill``: ``buf[key] = value`` with ``target=1``, so each value goes straight to
   disk, per key. *fresh*: a new buffer in a new folder every round (its part of the disk
   of its own, diskstate.py), written back (os.sync) before each round. *steady*: one
   long-lived buffer per contender; before each round it deletes the previous round's keys
   and diskpages' reaper is let catch up (``stats().pending == 0``), as in a worker that
   spills all day; on this disk in the saturated block group, the round starting in the next
   second (diskstate.py). ``test_unspill``: ``buf[key]`` of a spilled key, per key, fresh
   only (a read allocates nothing, so the disk's history does not enter), page cache hot
   (recently spilled), in two modes: "stays spilled" (``target=1``: read and deserialize;
   a value heavier than the target is not moved back) and "back to memory" (a target that
   holds them all: read, deserialize, move into memory and delete the spilled copy, which is
   ``os.remove`` for distributed; before each round every key is evicted again, untimed).
2. ``test_delete_spilled``: the caller's time to ``del buf[key]`` DELETE_KEYS spilled keys
   of 64 KiB, per key; fresh only (deleting allocates nothing). "written back": os.sync()
   after spilling (untimed), so every file owns blocks and, on this disk, each unlink waits
   for its discard, as for spill that has sat longer than the kernel's writeback delay;
   "in page cache": deleted before writeback. Secondary figure (``extra_info["gone"]``):
   the time from the first delete until the bytes are gone (diskpages: until
   ``stats().pending == 0``; distributed: when its loop ends).
3. ``test_cluster``, this disk only: a LocalCluster (2 worker processes, one thread each;
   a thread cluster in a smoke run) persists CLUSTER_BYTES of random chunks, several times
   the workers' targets (so most are spilled), computes their sum (reading the spilled
   chunks back) and releases them (``del`` of the futures, then until every worker's data is
   empty): wall time of the whole. ``distributed`` runs distributed's default SpillBuffer
   (its target set through ``distributed.worker.memory.target``), ``diskpages``
   ``data=(diskpages.dask.SpillBuffer, {"target": ...})``, the same target. An asyncio task
   on each worker's event loop sleeps PROBE_PERIOD at a time and records how late it wakes;
   the longest lateness is the loop's longest blocked interval, over the whole window and
   over the release alone, where distributed runs ``os.remove`` for every spilled key on
   the loop (``extra_info["loop"]``). Each contender keeps one cluster for all its rounds.

Run as root for the ext4-journal and tmpfs mounts (filesystems.py). distributed and dask are
needed (pip install '.[bench]'); without them the module is skipped.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip(
    "distributed", reason="distributed is not installed (pip install '.[bench]')"
)
np = pytest.importorskip("numpy")

from distributed.spill import SpillBuffer as DistributedSpillBuffer  # noqa: E402

from diskpages.dask import SpillBuffer  # noqa: E402

import diskstate  # noqa: E402
from conftest import ROUNDS, SMOKE, WARMUP, scaled  # noqa: E402
from harness import record  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = {"64KiB": 64 * KiB, "1MiB": MiB, "10MiB": 10 * MiB}
# keys a round: a round of some tens of milliseconds, ~scaled(32, 16) MiB a round
KEYS_PER_ROUND = {
    "64KiB": scaled(512, 256, 2),
    "1MiB": scaled(32, 16, 2),
    "10MiB": scaled(4, 3, 1),
}
# quick: 200 keys (a round of 12.5 MB a contender): 2,000 wrote 2.5 GB a written-back group
DELETE_KEYS = scaled(5000, 200, 20)
DELETE_SIZE = 64 * KiB
GONE_TIMEOUT = 60.0  # s: diskpages' reaper must have removed everything by then
BASELINE = "distributed"
OURS = "diskpages"
OURS_FILES = "diskpages pack_max=0"
FLOOR = "dict store (floor)"

# group 3
CLUSTER_PROCESSES = not SMOKE  # a thread cluster starts in a fraction of the time
CLUSTER_WORKERS = 2
CLUSTER_CHUNK = scaled(MiB, MiB, 256 * KiB)
CLUSTER_TARGET = scaled(16 * MiB, 16 * MiB, MiB)  # per worker
CLUSTER_BYTES = scaled(96 * MiB, 64 * MiB, 4 * MiB)  # 3x (full) the two workers' targets
CLUSTER_MEMORY_LIMIT = 4 << 30  # per worker: far above what it holds, so only the target spills
CLUSTER_ROUNDS = scaled(5, 3, 1)  # full: both cluster groups in ~2 minutes
PROBE_PERIOD = 0.002  # s
PROBE_NOTABLE = 0.001  # s of lateness worth recording (with its time)
CLUSTER_TIMEOUT = 120.0  # s for one step of one round


def array_of(nbytes: int, seed: int = 0):
    return np.random.default_rng(seed).random(nbytes // 8)


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label)


# -- the buffers -------------------------------------------------------------------------------


class DictStore(dict):
    """The floor's store, in place of distributed's File: a spilled value's parts kept as
    they are (no copy: storing costs nothing), joined into a new bytearray on every read (the
    copy File's read makes, without the file)."""

    def __getitem__(self, key):
        parts = super().__getitem__(key)
        return bytearray().join(parts) if isinstance(parts, (list, tuple)) else bytearray(parts)


def make_buffer(label: str, folder: Path, target: int):
    """A SpillBuffer of the contender ``label`` spilling under ``folder``."""
    if label == OURS:
        return SpillBuffer(str(folder), target=target)
    if label == OURS_FILES:
        return SpillBuffer(str(folder), target=target, pack_max=0)
    buf = DistributedSpillBuffer(str(folder), target=target)
    if label == FLOOR:
        buf._slow_uncached.d = DictStore()  # the File it made is empty and stays so
    return buf


def close_buffer(buf) -> None:
    file = getattr(buf, "file", None)
    if file is not None:
        file.close()  # diskpages: every page and the cache's folder go now


def wait_gone(buf, timeout: float = GONE_TIMEOUT) -> bool:
    """Until diskpages' reaper has removed every released page (True), or timeout (False).
    Returns at once for distributed's buffers: they remove in the deleting thread."""
    file = getattr(buf, "file", None)
    if file is None:
        return True
    deadline = time.monotonic() + timeout
    while file.cache.stats().pending:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


class BufferContender:
    """What every group's runner shares: a buffer in a folder, and closing both."""

    def __init__(self, label: str, disk: diskstate.Disk, target: int) -> None:
        self.label, self.disk, self.target = label, disk, target
        self.buf = None
        self.folder: Path | None = None

    def open(self, own_group: bool) -> None:
        self.folder = self.disk.folder(slug(self.label), own_group=own_group)
        self.buf = make_buffer(self.label, self.folder, self.target)

    def close(self) -> None:
        if self.buf is not None:
            close_buffer(self.buf)
            self.buf = None
        if self.folder is not None:
            diskstate.remove_tree(self.folder)
            self.folder = None

    def cleanup(self) -> None:
        self.close()


# -- group 1: spill and unspill ---------------------------------------------------------------


class Spill(BufferContender):
    """``buf[key] = value`` for ``per_round`` new keys, target 1: straight to disk.
    Fresh: a new buffer in a new folder every round, removed after it (untimed). Steady:
    one buffer; ``drop()`` deletes the previous round's keys and waits for the reaper."""

    def __init__(self, label, disk, steady: bool, value, n: int) -> None:
        super().__init__(label, disk, target=1)
        self.steady, self.value, self.per_round = steady, value, n
        self.keys: list[str] = []
        self.next = 0

    def setup(self):
        if self.buf is None:
            self.open(own_group=not self.steady)

    def run(self):
        buf, value, keys = self.buf, self.value, self.keys
        for i in range(self.next, self.next + self.per_round):
            key = f"x-{i}"
            buf[key] = value
            keys.append(key)
        self.next += self.per_round

    def finish(self, measured):
        assert len(self.buf.slow) == len(self.keys), "a value stayed in memory: not a spill"
        if not self.steady:
            self.keys = []
            self.close()

    def drop(self):
        if self.buf is None:
            return
        for key in self.keys:
            del self.buf[key]
        self.keys = []
        assert wait_gone(self.buf), f"{self.label}: pages still pending after {GONE_TIMEOUT} s"


class Unspill(BufferContender):
    """``buf[key]`` of ``per_round`` spilled keys. One buffer for all rounds, filled in the
    first setup (untimed). "stays spilled": target 1, the keys stay on disk. "back to
    memory": the target holds every key; each setup evicts them all to disk again."""

    def __init__(self, label, disk, mode: str, value, n: int) -> None:
        back = mode == "back to memory"
        super().__init__(label, disk, target=4 * n * value.nbytes if back else 1)
        self.back, self.value, self.per_round = back, value, n
        self.keys = [f"x-{i}" for i in range(n)]

    def setup(self):
        if self.buf is None:
            self.open(own_group=False)
            for key in self.keys:
                self.buf[key] = self.value.copy()  # a copy: no live value for zict's cache
        if self.back:
            while self.buf.fast:
                assert self.buf.evict() > 0
        assert len(self.buf.slow) == len(self.keys), "not every key is spilled"
        # distributed's weak cache of spilled values that are still alive somewhere: none
        # are, except in the floor's dict (its parts hold the arrays); every read goes to
        # the store
        self.buf.slow.cache.clear()

    def run(self):
        buf = self.buf
        for key in self.keys:
            value = buf[key]
        del value

    def finish(self, measured):
        expected = (len(self.keys), 0) if self.back else (0, len(self.keys))
        assert (len(self.buf.fast), len(self.buf.slow)) == expected

    def drop(self):
        pass  # the keys are the workload's state


def spill_contenders(disk, steady, value, n) -> dict[str, Spill]:
    labels = [BASELINE, OURS, OURS_FILES, FLOOR]
    return {label: Spill(label, disk, steady, value, n) for label in labels}


def skip_reason(size=None, state=None, **_) -> str | None:
    if SMOKE and size not in (None, "64KiB"):
        return "smoke run: 64 KiB values only"
    return None


def record_on(benchmark, disk, fs, group: str, runners: dict, n: int, **info) -> dict:
    """record() with what every group here shares: distributed's buffer as the baseline,
    the disk's warmup and per-round hook, and the file system it ran on."""
    return record(
        benchmark,
        f"{group} on {fs.label}",
        runners,
        n,
        BASELINE,
        ROUNDS,
        warmup=disk.warmup,
        before_round=disk.before_round,
        fs=fs.name,
        fs_info=fs.info,
        **info,
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_spill(benchmark, disk, state, fs, size):
    steady = state == "steady"
    disk.write_back_each_round = not steady  # fresh: no round pays for another's writeback
    value = array_of(SIZES[size])
    n = KEYS_PER_ROUND[size]
    record_on(
        benchmark,
        disk,
        fs,
        f"dask spill {size}, {state}",
        spill_contenders(disk, steady, value, n),
        n,
        kind="dask_spill",
        unit="key spilled (buf[key] = value, target=1)",
        size=SIZES[size],
        size_label=size,
        state=state,
        keys_per_round=n,
    )


@pytest.mark.parametrize("mode", ["stays spilled", "back to memory"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("state", ["fresh"])
def test_unspill(benchmark, disk, state, fs, size, mode):
    value = array_of(SIZES[size])
    n = KEYS_PER_ROUND[size]
    runners = {label: Unspill(label, disk, mode, value, n) for label in [BASELINE, OURS, OURS_FILES, FLOOR]}
    record_on(
        benchmark,
        disk,
        fs,
        f"dask unspill {size}, {mode}, {state}",
        runners,
        n,
        kind="dask_unspill",
        unit="key unspilled (buf[key])",
        size=SIZES[size],
        size_label=size,
        mode=mode,
        state=state,
        keys_per_round=n,
    )


# -- group 2: deleting spilled keys -----------------------------------------------------------


class DeleteSpilled(BufferContender):
    """Setup (untimed): a new buffer in a new folder, ``per_round`` keys spilled, and for
    "written back" os.sync(). Run: ``del buf[key]`` for all. Finish (untimed): until the
    bytes are gone (``gone_s``, from the first delete), then the folder goes."""

    def __init__(self, label, disk, written_back: bool, value, n: int) -> None:
        super().__init__(label, disk, target=1)
        self.written_back, self.value, self.per_round = written_back, value, n
        self.keys = [f"x-{i}" for i in range(n)]
        self.started = 0.0
        self.gone_s: list[float] = []

    def setup(self):
        self.open(own_group=True)
        buf, value = self.buf, self.value
        for key in self.keys:
            buf[key] = value
        assert len(buf.slow) == len(self.keys)
        if self.written_back and diskstate.Disk.write_back:  # not in a smoke run
            os.sync()

    def run(self):
        self.started = time.perf_counter()
        buf = self.buf
        for key in self.keys:
            del buf[key]

    def finish(self, measured):
        assert wait_gone(self.buf), f"{self.label}: pages still pending after {GONE_TIMEOUT} s"
        if measured:
            self.gone_s.append(time.perf_counter() - self.started)
        self.close()

    def drop(self):
        pass


@pytest.mark.parametrize("data", ["written back", "in page cache"])
@pytest.mark.parametrize("state", ["fresh"])
def test_delete_spilled(benchmark, disk, state, fs, data):
    value = array_of(DELETE_SIZE)
    n = DELETE_KEYS
    labels = [BASELINE, OURS, OURS_FILES, FLOOR]
    runners = {label: DeleteSpilled(label, disk, data == "written back", value, n) for label in labels}
    stats = record_on(
        benchmark,
        disk,
        fs,
        f"dask delete {n} spilled keys of 64 KiB, {data}, {state}",
        runners,
        n,
        kind="dask_delete",
        unit="key deleted (caller's time)",
        size=DELETE_SIZE,
        data=data,
        state=state,
        keys=n,
    )
    gone = {}
    for label, runner in runners.items():
        times = runner.gone_s
        gone[label] = {
            "median_s": statistics.median(times),
            "times_s": times,
            "over_callers_time": statistics.median(
                g / t for g, t in zip(times, stats[label]["times_s"], strict=True)
            ),
        }
    benchmark.extra_info["gone"] = gone


# -- group 3: a cluster that spills ---------------------------------------------------------


def _worker_side():
    """What client.run sends to the workers. Made in a function so that cloudpickle sends
    the functions themselves (a worker process cannot import this test module)."""
    import asyncio
    import time

    async def install_probe(dask_worker, period, notable):
        """An asyncio task on the worker's event loop: sleep ``period``, note how late it
        woke (lateness above ``notable`` is kept with the time it ended, monotonic clock)."""
        state = {"ticks": 0, "events": []}

        async def probe():
            while True:
                t0 = time.monotonic()
                await asyncio.sleep(period)
                t1 = time.monotonic()
                state["ticks"] += 1
                late = t1 - t0 - period
                if late > notable:
                    state["events"].append((t1, late))

        task = asyncio.get_running_loop().create_task(probe())
        dask_worker._diskpages_bench_probe = (state, task)

    def take_probe(dask_worker):
        state = dask_worker._diskpages_bench_probe[0]
        out = (state["ticks"], state["events"])
        state["ticks"], state["events"] = 0, []
        return out

    def stop_probe(dask_worker):
        dask_worker._diskpages_bench_probe[1].cancel()

    async def wait_empty(dask_worker, timeout):
        """Until the worker holds no key (the released ones are deleted); how many it holds."""
        deadline = time.monotonic() + timeout
        while len(dask_worker.data) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return len(dask_worker.data)

    def spill_info(dask_worker):
        """The buffer's kind and target, and its counters (distributed's spill metrics: the
        keys written and read, and the seconds the store's writes and reads took)."""
        data = dask_worker.data
        metrics = data.cumulative_metrics
        return {
            "module": type(data).__module__,
            "target": data.fast.n,
            "spilled": metrics.get(("disk-write", "count"), 0),
            "unspilled": metrics.get(("disk-read", "count"), 0),
            "write_s": metrics.get(("disk-write", "seconds"), 0.0),
            "read_s": metrics.get(("disk-read", "seconds"), 0.0),
        }

    return install_probe, take_probe, stop_probe, wait_empty, spill_info


INSTALL_PROBE, TAKE_PROBE, STOP_PROBE, WAIT_EMPTY, SPILL_INFO = _worker_side()


class Cluster:
    """A LocalCluster and its client for one contender, for the whole module, with the
    event loop probe installed on every worker."""

    def __init__(self, label: str, folder: Path) -> None:
        import dask
        from distributed import Client, LocalCluster

        self.label, self.folder = label, folder
        self.seeds = itertools.count(1)  # round i of each contender computes the same numbers
        options = dict(
            n_workers=CLUSTER_WORKERS,
            threads_per_worker=1,
            processes=CLUSTER_PROCESSES,
            memory_limit=CLUSTER_MEMORY_LIMIT,
            local_directory=str(folder),
            dashboard_address=None,
            # no dashboard; its HTTP server on any free port (not 8787, maybe someone's)
            scheduler_kwargs={"dashboard_address": ":0"},
        )
        config = {}
        if label == OURS:
            options["data"] = (SpillBuffer, {"target": CLUSTER_TARGET})
        else:  # distributed's default SpillBuffer, its target a fraction of memory_limit
            config["distributed.worker.memory.target"] = CLUSTER_TARGET / CLUSTER_MEMORY_LIMIT
        with dask.config.set(config):
            self.cluster = LocalCluster(**options)
        try:
            self.client = Client(self.cluster)
            info = self.client.run(SPILL_INFO)
            want = "diskpages.dask" if label == OURS else "distributed.spill"
            assert all(i["module"] == want and i["target"] == CLUSTER_TARGET for i in info.values()), info
            self.client.run(INSTALL_PROBE, period=PROBE_PERIOD, notable=PROBE_NOTABLE)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            try:
                client.run(STOP_PROBE)
            finally:
                client.close()
        self.cluster.close()
        diskstate.remove_tree(self.folder)


@pytest.fixture(scope="module")
def clusters(bench_root):
    """Per contender its Cluster, made on first use (seconds each) and shared by the
    module's cluster groups."""
    made: dict[str, Cluster] = {}

    def get(label: str) -> Cluster:
        if label not in made:
            made[label] = Cluster(label, diskstate.new_folder(bench_root, f"cluster-{slug(label)}"))
        return made[label]

    yield get
    for cluster in made.values():
        cluster.close()


class ClusterRun:
    """A round: persist CLUSTER_BYTES of random chunks (most spill), sum them, release them
    and wait until every worker's data is empty. "written back": the persist and an
    os.sync() happen in setup (untimed), so the spilled chunks own blocks on the disk; the
    round is the sum and the release."""

    def __init__(self, cluster: Cluster, written_back: bool) -> None:
        self.cluster, self.client, self.written_back = cluster, cluster.client, written_back
        self.per_round = 1
        self.x = None
        self.marks: tuple[float, ...] = ()
        self.rounds: list[dict] = []

    def persist(self):
        import dask.array as da

        # new keys every round: the same keys again could meet the scheduler still
        # forgetting the last round's, and be taken as already computed
        rng = da.random.default_rng(next(self.cluster.seeds))
        # this contender's client, named: dask's default client is the last one made
        x = self.client.persist(rng.random(CLUSTER_BYTES // 8, chunks=CLUSTER_CHUNK // 8))
        distributed.wait(x)
        return x

    def setup(self):
        self.client.run(TAKE_PROBE)  # forget what the loop saw between rounds
        self.before = self.client.run(SPILL_INFO)
        if self.written_back:
            self.x = self.persist()
            if diskstate.Disk.write_back:  # not in a smoke run
                os.sync()

    def run(self):
        t0 = time.monotonic()
        if self.written_back:
            x, self.x = self.x, None
        else:
            x = self.persist()
        t1 = time.monotonic()
        total = float(self.client.compute(x.sum()).result())
        t2 = time.monotonic()
        del x  # releases the futures: the workers delete every chunk, spilled or not
        left = self.client.run(WAIT_EMPTY, timeout=CLUSTER_TIMEOUT)
        t3 = time.monotonic()
        assert not any(left.values()), f"keys still held after {CLUSTER_TIMEOUT} s: {left}"
        assert 0 < total < CLUSTER_BYTES // 8
        self.marks = (t0, t1, t2, t3)

    def finish(self, measured):
        probes = self.client.run(TAKE_PROBE)
        after = self.client.run(SPILL_INFO)
        if not measured:
            return
        t0, t1, t2, t3 = self.marks
        events = [e for _, evs in probes.values() for e in evs]

        def lateness(lo, hi):
            return [late for t, late in events if lo < t <= hi]

        self.rounds.append(
            {
                "persist_s": t1 - t0,
                "compute_s": t2 - t1,
                "release_s": t3 - t2,
                "loop_max_s": max(lateness(t0, t3), default=0.0),
                "loop_max_release_s": max(lateness(t2, t3), default=0.0),
                "loop_late_sum_release_s": sum(lateness(t2, t3)),
                "loop_stalls_10ms": sum(1 for late in lateness(t0, t3) if late >= 0.01),
                "probe_ticks": sum(ticks for ticks, _ in probes.values()),
                **{
                    key: sum(after[w][key] - self.before[w][key] for w in after)
                    for key in ("spilled", "unspilled", "write_s", "read_s")
                },
            }
        )

    def drop(self):
        pass

    def cleanup(self):
        self.x = None


@pytest.mark.parametrize("spill", ["in page cache", "written back"])
def test_cluster(benchmark, clusters, spill):
    written_back = spill == "written back"
    runners = {label: ClusterRun(clusters(label), written_back) for label in (BASELINE, OURS)}
    what = "sum, release" if written_back else "persist, sum, release"
    stats = record(
        benchmark,
        f"dask LocalCluster {CLUSTER_BYTES // MiB} MiB, spill {spill}: {what}, on this disk",
        runners,
        1,
        BASELINE,
        CLUSTER_ROUNDS,
        warmup=WARMUP,
        kind="dask_cluster",
        unit=f"computation ({what})",
        spill=spill,
        processes=CLUSTER_PROCESSES,
        workers=CLUSTER_WORKERS,
        chunk=CLUSTER_CHUNK,
        target_per_worker=CLUSTER_TARGET,
        total_bytes=CLUSTER_BYTES,
        probe_period_s=PROBE_PERIOD,
    )
    loop = {}
    for label, runner in runners.items():
        rounds = runner.rounds
        assert len(rounds) == stats[label]["rounds"]
        assert all(r["spilled"] > 0 for r in rounds), f"{label}: nothing spilled: {rounds}"
        loop[label] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        loop[label]["rounds"] = rounds
    for key in ("loop_max_s", "loop_max_release_s", "loop_late_sum_release_s", "release_s"):
        pairs = zip(runners[OURS].rounds, runners[BASELINE].rounds, strict=True)
        ratios = [a[key] / b[key] for a, b in pairs if b[key] > 0]
        loop[OURS][f"{key}_over_{BASELINE}"] = statistics.median(ratios) if ratios else None
    benchmark.extra_info["loop"] = loop
