"""Memory parity: a dask job that spills thousands of ~200 KB chunks, on workers whose memory
monitor pauses them, with diskpages' buffer against distributed's own.

The workload of issue 22, scaled to this machine: a LocalCluster of 2 worker processes
(one thread each) with MEMORY_LIMIT each and dask's default memory settings (target 0.6,
spill 0.7, pause 0.8 of it), persists a random array of SIDE x SIDE float64 in CHUNK x
CHUNK chunks (160 x 160: 205 KB each; full: 1 GB, 4,900 chunks, 3x the two workers'
limits, so most are spilled), then computes ``(x + x.T).sum(0)``, which reads every chunk
back and moves half of them between the workers. Contenders, a new cluster for every run,
in interleaved rounds (harness.py):

- ``distributed``: distributed's own SpillBuffer (a file per spilled key). The baseline.
- ``diskpages``: the same cluster with the worker preload ``diskpages.dask``: the same
  target and memory settings, spilling to pages.

The time is the persist and the compute (not the cluster's start and stop). Per run, and
in ``extra_info["memory"]``: the "Pausing worker" warnings that distributed's memory
monitor logged (it pauses a worker whose process RSS, file-backed mappings included, passes
``pause`` x memory_limit), the peak RSS of either worker (psutil, as that monitor measures
it, sampled every RSS_PERIOD from this process, so a blocked worker's event loop does not
hide a peak), and the peak bytes on disk under the workers' folders (st_blocks, every
DISK_PERIOD). A thread in each worker keeps the peak of its own folder and of what its
buffer counts as spilled, so that the report can tell the store's layout (peak disk ÷
peak spilled) from how much each buffer spilled. A smoke run uses a thread cluster
with tiny chunks: it checks the code runs.

Run: python -m pytest benchmarks/test_dask_memory.py --benchmark-json=bench-memory.json
     python benchmarks/dask_report.py bench-memory.json
"""

from __future__ import annotations

import compileall
import os
import statistics
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip(
    "distributed", reason="distributed is not installed (pip install '.[bench]')"
)
np = pytest.importorskip("numpy")
psutil = pytest.importorskip("psutil")  # a dependency of distributed

import diskstate  # noqa: E402
from conftest import QUICK, SMOKE, WARMUP, scaled  # noqa: E402
from harness import record  # noqa: E402

BASELINE = "distributed"
OURS = "diskpages"
PROCESSES = not SMOKE
WORKERS = 2
CHUNK = scaled(160, 160, 32)  # 160 x 160 float64: 204,800 bytes
SIDE = scaled(11200, 8000, 640)  # full: 1.0 GB in 4,900 chunks; quick: 512 MB in 2,500
MEMORY_LIMIT = scaled(350_000_000, 300_000_000, 4 << 30)  # per worker
ROUNDS = scaled(5, 2, 1)  # full: ~40 s a run, 10 runs
# quick: no warmup run; each run spills ~250 MB to the disk, 4 runs are 1 GB
RUN_WARMUP = 0 if QUICK else WARMUP
RSS_PERIOD = 0.01  # s
DISK_PERIOD = 0.1  # s
TIMEOUT = 300.0  # s for one step of one run


class Sampler(threading.Thread):
    """Peak RSS of the worker processes and peak bytes on disk under ``folder``, until stopped."""

    def __init__(self, pids: list[int], folder: Path) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(pid) for pid in set(pids)]
        self.folder = folder
        self.peak_rss = 0
        self.peak_disk = 0
        self.halt = threading.Event()

    def run(self) -> None:
        next_disk = 0.0
        while not self.halt.is_set():
            for proc in self.procs:
                try:
                    self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
                except psutil.Error:  # a worker gone: its nanny restarts it, or the run ends
                    pass
            now = time.monotonic()
            if now >= next_disk:
                self.peak_disk = max(self.peak_disk, folder_bytes(self.folder))
                next_disk = now + DISK_PERIOD
            self.halt.wait(RSS_PERIOD)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def folder_bytes(folder: str | Path) -> int:
    """st_blocks of the files under ``folder``, as ``du`` counts them."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed since the listing
                pass
    return total


def start_spill_sampler(dask_worker) -> None:
    """Sent to the workers: a thread that reads what the worker's buffer counts as spilled
    (distributed's own ``spilled_total.disk``: the serialized bytes) every RSS_PERIOD, and
    the bytes on disk under the worker's folder every DISK_PERIOD, and keeps the peak of
    each. Their ratio is what a spilled byte takes on disk at the peak (the store's layout,
    and what it keeps of freed values), apart from how much each buffer spilled."""
    state = {"peak_disk": 0, "peak_spilled": 0}
    halt = threading.Event()

    def sample() -> None:
        next_disk = 0.0
        while not halt.wait(RSS_PERIOD):
            state["peak_spilled"] = max(state["peak_spilled"], dask_worker.data.spilled_total.disk)
            if time.monotonic() >= next_disk:
                state["peak_disk"] = max(state["peak_disk"], folder_bytes(dask_worker.local_directory))
                next_disk = time.monotonic() + DISK_PERIOD

    thread = threading.Thread(target=sample, daemon=True)
    dask_worker._bench_spill_sampler = (halt, thread, state)
    thread.start()


def stop_spill_sampler(dask_worker) -> dict | None:
    """Sent to the workers: stop the thread start_spill_sampler started; its peaks. None
    from a worker that has none: its nanny restarted it (after a crash, or past the
    terminate threshold), which the round then counts."""
    sampler = getattr(dask_worker, "_bench_spill_sampler", None)
    if sampler is None:
        return None
    halt, thread, state = sampler
    halt.set()
    thread.join()
    return state


def pauses_logged(dask_worker) -> int:
    """Sent to the workers: how many "Pausing worker" warnings this worker logged."""
    return sum("Pausing worker" in msg for _level, msg in dask_worker.get_logs())


class MemoryRun:
    """One round: a new cluster (untimed), the persist and the compute (timed), then the
    pauses, peaks and the cluster's close (untimed, in finish)."""

    def __init__(self, label: str, root: Path) -> None:
        self.label, self.root = label, root
        self.per_round = 1
        self.seed = 0
        self.cluster = self.client = self.sampler = None
        self.folder: Path | None = None
        self.rounds: list[dict] = []

    def setup(self) -> None:
        from distributed import Client, LocalCluster

        self.folder = diskstate.new_folder(self.root, f"memory-{self.label}")
        options: dict = dict(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=PROCESSES,
            memory_limit=MEMORY_LIMIT,
            local_directory=str(self.folder),
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},  # not 8787, maybe someone's
        )
        if self.label == OURS:
            options["preload"] = ["diskpages.dask"]
        self.cluster = LocalCluster(**options)
        self.client = Client(self.cluster)
        kinds = self.client.run(lambda dask_worker: type(dask_worker.data).__module__)
        want = "diskpages.dask" if self.label == OURS else "distributed.spill"
        assert set(kinds.values()) == {want}, kinds
        self.client.run(start_spill_sampler)
        pids = list(self.client.run(os.getpid).values())
        self.sampler = Sampler(pids, self.folder)
        self.sampler.start()

    def run(self) -> None:
        import dask.array as da

        self.seed += 1  # round i of each contender computes the same numbers
        rng = da.random.default_rng(self.seed)
        x = self.client.persist(rng.random((SIDE, SIDE), chunks=CHUNK))
        distributed.wait(x, timeout=TIMEOUT)
        total = self.client.compute((x + x.T).sum(0)).result(timeout=TIMEOUT)
        assert total.shape == (SIDE,) and 0 < float(total.sum()) < 2 * SIDE * SIDE

    def finish(self, measured: bool) -> None:
        try:
            self.sampler.stop()
            pauses = self.client.run(pauses_logged)
            sampled = list(self.client.run(stop_spill_sampler).values())
            spills = [w for w in sampled if w is not None]
            if measured:
                self.rounds.append(
                    {
                        "pauses": sum(pauses.values()),
                        "restarted": len(sampled) - len(spills),  # workers, during the run
                        "peak_rss": self.sampler.peak_rss,
                        "peak_spill_disk": self.sampler.peak_disk,
                        # per worker, summed: the peak of what each buffer had spilled,
                        # and each folder's peak on disk ÷ it
                        "peak_spilled": sum(w["peak_spilled"] for w in spills),
                        "disk_per_spilled": (  # 0: nothing spilled (a smoke run)
                            sum(w["peak_disk"] for w in spills) / spilled
                            if (spilled := sum(w["peak_spilled"] for w in spills))
                            else 0.0
                        ),
                    }
                )
        finally:
            self.close()

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self.folder is not None:
            diskstate.remove_tree(self.folder)
            self.folder = None

    def drop(self) -> None:
        pass

    def cleanup(self) -> None:
        self.close()


def bytecode_for_workers() -> None:
    """Write diskpages' bytecode, as ``pip install`` does for distributed's. From a checkout
    (an editable install) under PYTHONDONTWRITEBYTECODE, every worker would compile the
    package from source instead, and keep ~1.3 MB of memory that compiling took (measured
    on this machine): process memory that distributed's precompiled modules do not cost."""
    import diskpages

    compileall.compile_dir(os.path.dirname(diskpages.__file__), quiet=1)


def test_cluster_memory(benchmark, bench_root):
    bytecode_for_workers()
    runners = {label: MemoryRun(label, bench_root) for label in (BASELINE, OURS)}
    chunk_bytes = CHUNK * CHUNK * 8
    stats = record(
        benchmark,
        f"dask memory: (x + x.T).sum(0), {SIDE * SIDE * 8 // 10**6} MB in chunks of "
        f"{chunk_bytes // 1000} KB, workers of {MEMORY_LIMIT // 10**6} MB, on this disk",
        runners,
        1,
        BASELINE,
        ROUNDS,
        warmup=RUN_WARMUP,
        kind="dask_memory",
        unit="computation (persist, (x + x.T).sum(0))",
        processes=PROCESSES,
        workers=WORKERS,
        chunk_bytes=chunk_bytes,
        chunks=(SIDE // CHUNK) ** 2,
        total_bytes=SIDE * SIDE * 8,
        memory_limit=MEMORY_LIMIT,
    )
    memory = {}
    for label, runner in runners.items():
        rounds = runner.rounds
        assert len(rounds) == stats[label]["rounds"]
        memory[label] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        memory[label]["pauses_total"] = sum(r["pauses"] for r in rounds)
        memory[label]["rounds"] = rounds
    benchmark.extra_info["memory"] = memory
