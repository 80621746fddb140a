"""diskpages.dask.SpillBuffer: the same behaviour as distributed's own, seen from a worker
(checked side by side), removal off the caller's thread, and real clusters, with process
workers (one killed with SIGKILL) and thread workers, that spill and compute right."""

import asyncio
import gc
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")
np = pytest.importorskip("numpy")
from distributed.spill import SpillBuffer as TheirSpillBuffer  # noqa: E402

from diskpages.dask import SpillBuffer as _SpillBuffer  # noqa: E402
from diskpages.dask import SpillFile  # noqa: E402

MiB = 1024 * 1024
_made: list = []


def SpillBuffer(*args, **kwargs):  # noqa: N802 - the class, remembered to be closed
    buf = _SpillBuffer(*args, **kwargs)
    _made.append(buf)
    return buf


@pytest.fixture(autouse=True)
def close_buffers():
    """Each buffer's cache closes at the end of its test (its reaper thread with it), not
    whenever a log record's traceback lets go of it."""
    yield
    while _made:
        _made.pop().close()


def value(i: int, nbytes: int = 100_000):
    return np.full(nbytes // 8, i, dtype="float64")


def state(buf) -> tuple:
    """What a worker and its memory manager can see of a SpillBuffer."""
    return (
        sorted(map(str, buf.fast)),
        sorted(map(str, buf.slow)),
        sorted(map(str, buf)),
        tuple(buf.spilled_total),
        buf.fast.total_weight,
    )


def run_side_by_side(tmp_path, ops, **options):
    """The same operations on distributed's SpillBuffer and ours; the states after each."""
    theirs = TheirSpillBuffer(str(tmp_path / "theirs"), **options)
    ours = SpillBuffer(str(tmp_path / "ours"), **options)
    for op, *args in ops:
        results = []
        for buf in (theirs, ours):
            try:
                if op == "set":
                    buf[args[0]] = value(*args[1:])
                    results.append(None)
                elif op == "get":
                    results.append(float(buf[args[0]][0]))
                elif op == "del":
                    del buf[args[0]]
                    results.append(None)
                elif op == "evict":
                    results.append(buf.evict())
            except Exception as e:  # the same exception, from both
                results.append(type(e).__name__)
        assert results[0] == results[1], (op, args)
        assert state(theirs) == state(ours), (op, args)
    return theirs, ours


def test_behaves_as_distributeds_own(tmp_path):
    ops = [("set", f"x{i}", i) for i in range(8)]
    ops += [("get", "x0"), ("get", "x7"), ("del", "x1"), ("del", "x6"), ("evict",), ("evict",)]
    ops += [("set", ("tuple-key", 1), 99), ("set", "big", 5, 400_000), ("get", "big")]
    ops += [("set", "x2", 42), ("get", "x2")]
    theirs, ours = run_side_by_side(tmp_path, ops, target=300_000)
    assert ours.cumulative_metrics["disk-write", "count"] == theirs.cumulative_metrics["disk-write", "count"]
    assert (
        ours.cumulative_metrics["disk-read", "count"] == theirs.cumulative_metrics["disk-read", "count"] > 0
    )
    assert isinstance(ours._slow_uncached.d, SpillFile) and ours._slow_uncached.d is ours.file
    assert len(ours.file) == len(ours.slow) > 0 and ours.file.cache.stats().live_pages == len(ours.slow)
    assert os.listdir(tmp_path / "ours") == [ours.file.cache.path.name]


def test_max_spill_keeps_keys_in_memory_as_distributeds_own(tmp_path, caplog):
    ops = [("set", f"x{i}", i) for i in range(10)] + [("evict",), ("get", "x0"), ("get", "x9")]
    with caplog.at_level(logging.WARNING, logger="distributed.spill"):
        theirs, ours = run_side_by_side(tmp_path, ops, target=300_000, max_spill=250_000)
    assert len(ours.slow) == 2 and len(ours.fast) == 8
    assert "reached capacity" in caplog.text
    assert float(ours["x5"][0]) == 5


def test_a_full_disk_keeps_the_key_in_memory_and_collects_nothing(tmp_path, caplog, no_gc):
    """max_bytes reached is a CacheFullError, an OSError: distributed's handling of a full
    disk keeps the key in memory. And no collection runs in the spilling thread."""
    collections = []
    buf = SpillBuffer(str(tmp_path), target=150_000, max_bytes=250_000, pack_max=0)
    gc.callbacks.append(lambda phase, info: collections.append(phase))
    try:
        with caplog.at_level(logging.ERROR, logger="distributed.spill"):
            for i in range(6):
                buf[f"x{i}"] = value(i)
            assert buf.evict() in (-1, 100_000)
    finally:
        gc.callbacks.pop()
    assert len(buf.slow) == 2 and len(buf.fast) == 4 and sorted(buf) == [f"x{i}" for i in range(6)]
    assert "Spill to disk failed" in caplog.text and collections == []
    # nothing lost: each key is in memory or in a page (read without unspilling: reading
    # through the buffer would evict, and meet the full disk again, as distributed's does)
    got = {k: float(v[0]) for k, v in buf.fast.items()}
    got |= {k: float(buf.slow[k][0]) for k in list(buf.slow)}
    assert got == {f"x{i}": float(i) for i in range(6)}


def test_deleting_spilled_keys_removes_nothing_in_the_callers_thread(tmp_path):
    buf = SpillBuffer(str(tmp_path), target=1, pack_max=0, max_delay=30.0, batch=100_000)
    for i in range(50):
        buf[f"x{i}"] = value(i, 20_000)
    files = set(os.listdir(buf.file.cache.path))
    assert len(buf.slow) == 50 and len(files) == 50
    for i in range(50):
        del buf[f"x{i}"]
    assert set(os.listdir(buf.file.cache.path)) == files  # not one removed yet
    assert buf.file.cache.stats().pending == 50
    buf.file.cache.remove_released()
    assert os.listdir(buf.file.cache.path) == []


def test_a_workers_folder_holds_the_spill(tmp_path):
    buf = SpillBuffer(target=1, worker_local_directory=str(tmp_path))
    buf["x"] = value(1)
    assert buf.file.cache.path.parent == tmp_path / "storage"
    with pytest.raises(TypeError, match="spill_directory"):
        SpillBuffer(target=1)
    with pytest.raises(TypeError, match="target"):
        SpillBuffer(str(tmp_path))


def test_sizes_are_bytes_or_dask_size_strings(tmp_path):
    """As memory_limit takes them; before, "150kB" was taken and failed at the first spill."""
    buf = SpillBuffer(str(tmp_path), target="150kB", max_spill="1.5 MiB", max_bytes="8 MiB", pack_max="64kiB")
    assert buf.n == 150_000 and buf.max_spill == buf._slow_uncached.max_weight == 1_572_864
    assert buf.file.cache.max_bytes == 8 * MiB and buf.file.cache.pack_max == 64 * 1024
    for i in range(4):
        buf[f"x{i}"] = value(i)  # 100 kB each: the first spill is the second value
    assert len(buf.slow) == 3 and float(buf["x0"][0]) == 0
    assert SpillBuffer(str(tmp_path), 1e6, 2_000_000.0).n == 1_000_000


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"target": "lots"}, ValueError, "target='lots' is not a size"),
        ({"target": "-1MB"}, ValueError, "target='-1MB' must be a finite number of bytes, 0 or more"),
        ({"target": float("inf")}, ValueError, "target=inf must be a finite"),
        ({"target": True}, TypeError, "target must be a number of bytes or a size such as '360MB'"),
        ({"target": [1]}, TypeError, "target must be a number of bytes"),
        ({"target": 1, "max_spill": "1 parsec"}, ValueError, "max_spill='1 parsec' is not a size"),
        ({"target": 1, "max_bytes": "full"}, ValueError, "max_bytes='full' is not a size"),
    ],
)
def test_a_wrong_size_fails_at_construction_naming_it(tmp_path, options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SpillBuffer(str(tmp_path), **options)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "name, meant",
    [
        ("root", "spill_directory"),
        ("directory", "spill_directory"),
        ("local_directory", "worker_local_directory"),
        ("max_byte", "max_bytes"),
        ("maxspill", "max_spill"),
        ("targt", "target"),
        ("collect_when_ful", "collect_when_full"),
    ],
)
def test_a_misnamed_option_says_which_was_meant(tmp_path, name, meant):
    with pytest.raises(TypeError, match=f"unexpected option '{name}'; did you mean {meant}=") as info:
        SpillBuffer(str(tmp_path / "spill"), target=1, **{name: str(tmp_path)})
    assert "spill_directory, target, max_spill, worker_local_directory" in str(info.value)
    with pytest.raises(TypeError, match="unexpected option 'colour'.*PageCache options sync, batch"):
        SpillBuffer(str(tmp_path / "spill"), target=1, colour="blue")


def test_the_spill_file_says_root_is_its_directory(tmp_path):
    with pytest.raises(TypeError, match="SpillFile takes no root=: directory is the cache's root"):
        SpillFile(str(tmp_path), root=str(tmp_path))


def test_a_wrong_option_stops_a_cluster_at_start_up(tmp_path):
    from distributed import LocalCluster

    with pytest.raises(ValueError, match="target='1.2 GB of RAM' is not a size"):
        LocalCluster(
            n_workers=1,
            processes=False,
            local_directory=str(tmp_path),
            dashboard_address=None,
            data=(_SpillBuffer, {"target": "1.2 GB of RAM"}),
        )


# -- real clusters ---------------------------------------------------------------------------


CHUNK = 2 * MiB
NCHUNKS = 96  # 192 MiB in all, 6x the two workers' targets together
TARGET = 16 * MiB
SPY = Path(__file__).with_name("dask_purge_spy.py")


def leftovers(folder: Path) -> list[str]:
    """Page files and segments anywhere under folder."""
    return [
        str(p)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".page", ".slots", ".part", ".handed")
    ]


def cluster_of(folder: Path, processes: bool, **how):
    """Two one-thread workers spilling to pages under folder (through ``data=`` unless
    ``how`` says otherwise), with memory to spare beyond TARGET (so the memory monitor,
    pausing and the nanny's kill stay out of it). Process workers load the purge spy, added
    to the preloads dask's configuration names."""
    import dask
    from distributed import LocalCluster

    how = how or {"data": (_SpillBuffer, {"target": TARGET})}
    how.setdefault("memory_limit", "1 GiB")
    preload = dask.config.get("distributed.worker.preload") + ([str(SPY)] if processes else [])
    with dask.config.set({"distributed.worker.preload": preload}):
        return LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=processes,
            local_directory=str(folder),
            dashboard_address=None,
            **how,
        )


@pytest.fixture
def distributed_logs(monkeypatch, capfd):
    """What distributed logs, from this process (thread workers: a handler on its logger,
    which does not propagate) and from process workers (their stderr), with the purge spy
    wrapped around this process's folder removal. Call it after the cluster closed."""
    import dask_purge_spy
    from distributed.diskutils import WorkSpace

    monkeypatch.setattr(WorkSpace, "_purge_directory", dask_purge_spy.spying(WorkSpace._purge_directory))
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(f"{r.name} - {r.levelname} - {r.getMessage()}")
    logger = logging.getLogger("distributed")
    logger.addHandler(handler)
    yield lambda: records + capfd.readouterr().err.splitlines()
    logger.removeHandler(handler)


def assert_quiet_about_the_spill(lines: list[str]) -> None:
    """No ERROR or WARNING from distributed about the spill folder (issue 19, finding 6:
    at close, "Failed to remove '.../storage/<cache>/289.page' ... No such file")."""
    noisy = [
        line
        for line in lines
        if ("ERROR" in line or "WARNING" in line)
        and any(word in line for word in ("distributed.diskutils", "storage", "diskpages", "preload"))
    ]
    assert noisy == []


def compute(client):
    """A reduction over NCHUNKS chunks held at once (persisted): several times memory."""
    import dask.array as da

    n = NCHUNKS * CHUNK // 8
    x = da.arange(n, chunks=CHUNK // 8, dtype="float64").persist()
    distributed.wait(x)
    total = float((x * 2).sum().compute())
    assert total == float(n) * (n - 1)  # 2 * (0 + 1 + ... + n-1)
    return x


def spilled(client) -> dict[str, float]:
    return client.run(lambda dask_worker: dask_worker.data.cumulative_metrics.get(("disk-write", "count"), 0))


def test_a_process_cluster_spills_computes_survives_a_kill_and_closes_quietly(tmp_path, distributed_logs):
    from distributed import Client

    with cluster_of(tmp_path, processes=True) as cluster, Client(cluster) as client:
        x = compute(client)
        assert all(n > 0 for n in spilled(client).values())  # both workers spilled
        kinds = client.run(lambda dask_worker: type(dask_worker.data.file).__module__)
        assert set(kinds.values()) == {"diskpages.dask"}
        folders = client.run(lambda dask_worker: str(dask_worker.data.file.cache.path))
        assert all(leftovers(Path(f)) for f in folders.values())

        victim, folder = next(iter(folders.items()))
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        compute(client)  # lost chunks are recomputed; the answer is right again
        deadline = time.monotonic() + 30
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # the nanny's new worker takes a new folder; dask purges the dead one's
        while Path(folder).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(folder).exists(), "the killed worker's spill folder was not swept"
        del x  # pages released as the cluster closes: the reaper is busy then
    assert leftovers(tmp_path) == []
    assert_quiet_about_the_spill(distributed_logs())


def test_a_thread_cluster_spills_computes_and_closes_quietly(tmp_path, distributed_logs):
    from distributed import Client

    with cluster_of(tmp_path, processes=False) as cluster, Client(cluster) as client:
        x = compute(client)
        assert all(n > 0 for n in spilled(client).values())
        ls = subprocess.run(
            [sys.executable, "-m", "diskpages", "ls", "--dask", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        folders = client.run(lambda dask_worker: dask_worker.data.file.cache.path.name)
        assert all(f"  {name}  pid {os.getpid()} " in ls.stdout for name in folders.values()), ls.stdout
        assert ls.stdout.count("dask worker ") == 2
        del x
    assert leftovers(tmp_path) == []  # closed with the workers, not at a later collection
    assert_quiet_about_the_spill(distributed_logs())


def test_a_shared_or_used_spill_directory_works(tmp_path):
    """Workers may share one spill_directory (each cache makes its own folder in it), and
    a folder with other files in it is no obstacle."""
    (tmp_path / "someone-elses-file").write_bytes(b"x")
    first = SpillBuffer(str(tmp_path), target=1)
    second = SpillBuffer(str(tmp_path), target=1)
    first["a"], second["a"] = value(1), value(2)
    assert float(first["a"][0]) == 1 and float(second["a"][0]) == 2
    assert first.file.cache.path != second.file.cache.path


def test_a_group_writable_umask_is_no_obstacle(tmp_path):
    """Under umask 002 distributed's own File makes the folder 775, which diskpages would
    refuse as a root others can write to: the folder is made private first."""
    old = os.umask(0o002)
    try:
        buf = SpillBuffer(target=1, worker_local_directory=str(tmp_path / "worker"))
        buf["x"] = value(3)
        assert float(buf["x"][0]) == 3
        assert (tmp_path / "worker" / "storage").stat().st_mode & 0o077 == 0
    finally:
        os.umask(old)


def test_close_removes_the_spill_and_keeps_the_rest_in_memory(tmp_path):
    buf = SpillBuffer(str(tmp_path), target=150_000)
    for i in range(4):
        buf[f"x{i}"] = value(i)
    folder = buf.file.cache.path
    assert len(buf.slow) == 3 and folder.exists()
    buf.close()
    assert not folder.exists() and os.listdir(tmp_path) == []  # at once, not by the reaper
    assert len(buf.slow) == 0 and list(buf.fast) == ["x3"]
    buf["y"] = value(5, 400_000)  # more than target: kept in memory all the same
    assert buf.evict() == -1 and sorted(buf.fast) == ["x3", "y"] and float(buf["y"][0]) == 5
    buf.close()  # again: nothing to do


# -- zero configuration: the preload ---------------------------------------------------------


#: dask's own settings: a target of TARGET out of the workers' 1 GiB, and a max-spill
MEMORY = {
    "distributed.worker.memory.target": TARGET / 2**30,
    "distributed.worker.memory.max-spill": "150 MiB",
}
PRELOAD = {"distributed.worker.preload": ["diskpages.dask"]}


def sizes(client) -> set[tuple]:
    """The buffer's kind, target and max-spill on every worker, and whether the memory
    monitor (dask's spill and pause fractions) still watches it."""
    return set(
        client.run(
            lambda dask_worker: (
                type(dask_worker.data).__module__,
                dask_worker.data.n,
                dask_worker.data._slow_uncached.max_weight,
                dask_worker.memory_manager.memory_spill_fraction,
                "memory_monitor" in dask_worker.periodic_callbacks,
            )
        ).values()
    )


def test_the_preload_gives_every_worker_pages_sized_by_dasks_own_settings(tmp_path, distributed_logs):
    """Thread workers, side by side with distributed's own buffer under the same settings."""
    import dask
    from distributed import Client

    with dask.config.set(MEMORY):
        with (
            cluster_of(tmp_path / "theirs", processes=False, data=None) as cluster,
            Client(cluster) as client,
        ):
            theirs = sizes(client)
        with (
            dask.config.set(PRELOAD),
            cluster_of(tmp_path / "ours", processes=False, data=None) as cluster,
            Client(cluster) as client,
        ):
            ours = sizes(client)
            x = compute(client)
            assert all(n > 0 for n in spilled(client).values())
            del x
    assert theirs == {("distributed.spill", TARGET, 150 * MiB, 0.7, True)}
    assert ours == {("diskpages.dask", TARGET, 150 * MiB, 0.7, True)}
    assert leftovers(tmp_path) == []
    assert_quiet_about_the_spill(distributed_logs())


def test_the_preload_in_dasks_configuration_reaches_process_workers(tmp_path, distributed_logs):
    import dask
    from distributed import Client

    with dask.config.set({**MEMORY, **PRELOAD}):
        with cluster_of(tmp_path, processes=True, data=None) as cluster, Client(cluster) as client:
            assert sizes(client) == {("diskpages.dask", TARGET, 150 * MiB, 0.7, True)}
            x = compute(client)
            assert all(n > 0 for n in spilled(client).values())
            modes = client.run(lambda dask_worker: os.stat(dask_worker.data.file.cache.path.parent).st_mode)
            assert all(mode & 0o077 == 0 for mode in modes.values())  # storage made private
            del x
    assert leftovers(tmp_path) == []
    assert_quiet_about_the_spill(distributed_logs())


def test_the_preload_keeps_a_data_buffer_and_leaves_a_worker_that_spills_nothing(tmp_path, distributed_logs):
    import dask
    from distributed import Client

    with dask.config.set(PRELOAD):
        with cluster_of(tmp_path / "given", processes=False) as cluster, Client(cluster) as client:
            assert {n for _, n, *_ in sizes(client)} == {TARGET}  # data= kept, as given
            plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
            assert all("diskpages.dask" in names for names in plugins.values())
        with (
            cluster_of(tmp_path / "none", processes=False, data=None, memory_limit=0) as cluster,
            Client(cluster) as client,
        ):
            kinds = client.run(lambda dask_worker: type(dask_worker.data).__name__)
            assert set(kinds.values()) == {"dict"}  # no memory limit: dask spills nothing, nor do we
    assert_quiet_about_the_spill(distributed_logs())  # the preload logged no failure either


def test_the_preload_is_for_workers():
    from diskpages.dask import dask_setup

    with pytest.raises(TypeError, match="worker preload"):
        asyncio.run(dask_setup(object()))
