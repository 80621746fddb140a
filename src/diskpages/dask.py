"""``diskpages.dask``: dask workers that spill to pages.

Zero configuration: name this module as a worker preload, and every worker spills through
pages with the ``target`` and ``max-spill`` that dask's own settings
(``distributed.worker.memory.*`` and the worker's ``memory_limit``) give its own buffer::

    dask.config.set({"distributed.worker.preload": ["diskpages.dask"]})
    # or: LocalCluster(preload=["diskpages.dask"]), dask worker --preload diskpages.dask

By hand, ``SpillBuffer`` is a drop-in for ``distributed.spill.SpillBuffer`` given as
``data=``; dask's memory settings then do not reach it, so ``target`` is yours to give::

    LocalCluster(memory_limit="2 GiB", data=(diskpages.dask.SpillBuffer, {"target": "1.2 GiB"}))

Everything a worker and its memory manager see is distributed's SpillBuffer: ``fast``,
``slow``, ``evict()``, ``spilled_total``, ``cumulative_metrics``, a full disk keeping the
key in memory. Only the store under it differs (``self.file``, a ``diskpages.zict.File``),
so deleting a spilled key costs the event loop a release, not an ``os.remove``. Either way
the worker closes the buffer (its pages and folder removed) before it removes its own
folder. Needs distributed (``pip install "diskpages[dask]"``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Literal

import zict
from dask.utils import parse_bytes
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.spill import SpillBuffer as _DistributedSpillBuffer

from . import PageCache
from .zict import File

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["SpillBuffer", "SpillFile", "dask_setup"]

logger = logging.getLogger(__name__)

#: The worker plugin that closes a worker's SpillBuffer when the worker closes.
PLUGIN_NAME = "diskpages.dask"

# The options SpillBuffer takes, and the names a user may write for them.
_OWN_OPTIONS = ("spill_directory", "target", "max_spill", "worker_local_directory", "memmap")
_CACHE_OPTIONS = tuple(
    name
    for name, p in inspect.signature(PageCache).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)
_MEANT = {
    "root": "spill_directory",
    "directory": "spill_directory",
    "path": "spill_directory",
    "local_directory": "worker_local_directory",
    "memory_target": "target",
    "n": "target",
    "max-spill": "max_spill",
}
_SIZES = ("max_bytes", "pack_max")  # cache options that are sizes too


class SpillFile(File):
    """``diskpages.zict.File`` for dask keys: any hashable key (str, tuple...), as
    distributed's own spill file takes."""

    def _check_key(self, key: object) -> None:
        if not isinstance(key, Hashable):
            raise TypeError(f"keys must be hashable, not {type(key).__name__}")


class SpillBuffer(_DistributedSpillBuffer):
    """distributed's SpillBuffer, spilling to pages.

    ``spill_directory``, ``target`` and ``max_spill`` mean what they mean there; sizes are
    numbers of bytes or dask size strings (``"360MB"``, ``"1.2 GiB"``), checked here. Given
    ``worker_local_directory`` instead of ``spill_directory`` (a worker passes it when built
    through ``data=(SpillBuffer, {...})``), spills go under ``<it>/storage``, removed with
    the worker's folder by dask, and the buffer is closed by its worker when the worker
    closes, before the folder is removed. ``cache_options`` go to the PageCache
    (``self.file.cache``; ``max_bytes`` and ``pack_max`` may be size strings too);
    ``collect_when_full`` is False unless given, so that a ``max_bytes`` reached raises in
    the event loop's thread (the key stays in memory) instead of running the cycle
    collector there. A misspelt or unknown option raises ``TypeError`` naming the option
    meant.
    """

    max_spill: int | Literal[False]  #: bytes of spilled values at most (False: no limit)

    def __init__(
        self,
        spill_directory: str | os.PathLike[str] | None = None,
        target: int | float | str | None = None,
        max_spill: int | float | str | Literal[False] = False,
        *,
        worker_local_directory: str | None = None,
        **cache_options: Any,
    ) -> None:
        _check_options(cache_options)
        private = False
        if spill_directory is None:
            if worker_local_directory is None:
                raise TypeError("SpillBuffer needs spill_directory (or a worker's worker_local_directory)")
            spill_directory = os.path.join(worker_local_directory, "storage")
            private = True
        if target is None:
            raise TypeError(
                "SpillBuffer needs target: the bytes of managed memory to start spilling at "
                "(or let dask's settings size it: the preload diskpages.dask)"
            )
        target_bytes = _size("target", target)
        self.max_spill = False if max_spill is False else _size("max_spill", max_spill)
        for name in _SIZES:
            if cache_options.get(name) is not None:
                cache_options[name] = _size(name, cache_options[name])
        spill_directory = os.fspath(spill_directory)
        # Made private before distributed's own File makes it with the umask's mode (775
        # under umask 002), which PageCache would refuse as a root others can write to. A
        # worker's own storage folder is made private even if it exists already (the
        # preload finds it made by distributed's buffer); a folder the user named is not
        # changed.
        os.makedirs(spill_directory, mode=0o700, exist_ok=True)
        if private:
            os.chmod(spill_directory, 0o700)
        super().__init__(spill_directory, target_bytes, self.max_spill)
        cache_options.setdefault("collect_when_full", False)
        file = None
        try:
            file = SpillFile(spill_directory, **cache_options)
            self.file = file
            self._closed = False
            self._swap_store(file)
            if worker_local_directory is not None:
                _close_with_worker_soon(self, worker_local_directory)
        except BaseException:
            # closed now: a half-built distributed SpillBuffer sits in reference cycles, so
            # its cache (folder, fds, reaper) would wait for the collector, or a kept
            # traceback, to let it go
            if file is not None:
                file.close()
            raise

    def _swap_store(self, file: File) -> None:
        """Put ``file`` under distributed's spill logic, in place of its zict.File (which
        only listed the folder: anything in it, other workers' cache folders included, is
        not this buffer's). Checked, so that a distributed whose spill layers changed fails
        here, at once, rather than spilling somewhere else."""
        cached = self.slow
        slow = getattr(cached, "data", None)
        store = getattr(slow, "d", None)
        if not (isinstance(cached, zict.Cache) and isinstance(store, zict.File)):
            raise RuntimeError(
                "this version of distributed.spill.SpillBuffer is not laid out as diskpages "
                "expects (Cache over Func over File); diskpages.dask cannot wrap it"
            )
        slow.d = file  # type: ignore[union-attr]

    def evict(self) -> int:
        if self._closed:  # nothing goes to disk any more: as a full disk, to the worker
            return -1
        return super().evict()

    def close(self) -> None:
        """Remove every spilled value's page and the cache's folder now (they are gone
        when this returns); values in memory stay, and from now on nothing is spilled.
        Idempotent. A worker calls it as it closes, before it removes its folder."""
        self._closed = True
        self.n = math.inf  # nothing is evicted to a closed file
        self.file.close()

    def __del__(self) -> None:
        # zict closes a mapping in __del__; here the spill file's cache has a finalizer of
        # its own, which removes the pages however this buffer dies (half built, too).
        pass


def _size(name: str, value: object) -> int:
    """A size option as bytes: a non-negative number, or a dask size string."""
    if isinstance(value, str):
        try:
            nbytes: float = parse_bytes(value)
        except ValueError:
            raise ValueError(
                f"SpillBuffer: {name}={value!r} is not a size "
                "(a number of bytes, or a string such as '360MB' or '1.5 GiB')"
            ) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        nbytes = value
    else:
        raise TypeError(
            f"SpillBuffer: {name} must be a number of bytes or a size such as '360MB', not {value!r}"
        )
    if not (0 <= nbytes < math.inf):
        raise ValueError(f"SpillBuffer: {name}={value!r} must be a finite number of bytes, 0 or more")
    return int(nbytes)


def _check_options(options: dict[str, Any]) -> None:
    """TypeError for an option neither SpillBuffer nor PageCache takes, naming the one
    meant (``root=`` is spill_directory: the cache's root is always the spill folder)."""
    for name in options:
        if name in _CACHE_OPTIONS or name == "memmap":
            continue
        import difflib  # only to say what was meant: a worker need not load it

        meant = _MEANT.get(name) or next(
            iter(difflib.get_close_matches(name, _OWN_OPTIONS + _CACHE_OPTIONS, n=1)), None
        )
        hint = f"; did you mean {meant}=?" if meant else ""
        raise TypeError(
            f"SpillBuffer got an unexpected option {name!r}{hint} (it takes "
            f"{', '.join(_OWN_OPTIONS[:4])}, and the PageCache options {', '.join(_CACHE_OPTIONS)})"
        )


# -- the worker ---------------------------------------------------------------------------


class _ClosesSpillBuffer(WorkerPlugin):
    """Closes the worker's SpillBuffer at the worker's close. Plugins are torn down early
    in ``Worker.close``; the worker removes its folder (``rmtree``) at its very end. Closed
    first, the buffer's cache has removed its pages and folder before that walk starts, so
    the cache's reaper never removes a file the walk has listed (which distributed logs
    as "Failed to remove ... No such file or directory")."""

    def __init__(self, buffer: SpillBuffer) -> None:
        self.buffer = buffer

    def teardown(self, worker: Worker) -> None:
        self.buffer.close()


async def _close_with(worker: Worker, buffer: SpillBuffer) -> None:
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not (isinstance(plugin, _ClosesSpillBuffer) and plugin.buffer is buffer):
        await worker.plugin_add(_ClosesSpillBuffer(buffer), name=PLUGIN_NAME)


_attaching: set[asyncio.Task[None]] = set()


def _close_with_worker_soon(buffer: SpillBuffer, local_directory: str) -> None:
    """A buffer made through ``data=`` is made inside ``Worker.__init__``, on the worker's
    event loop, with no reference to the worker: once that returns, find the worker whose
    data it is and have it close the buffer as it closes."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not made by a worker: closed by close(), or at exit
        return

    def attach() -> None:
        from distributed import Worker

        # Worker._instances: distributed's own registry of this process's workers (its
        # get_worker() and Worker.close() read it). Without it, or a worker holding this
        # buffer, the cache still closes, with its process.
        for worker in list(getattr(Worker, "_instances", ())):
            if worker.local_directory == local_directory and worker.data is buffer:
                task = loop.create_task(_close_with(worker, buffer))
                _attaching.add(task)  # the loop holds tasks weakly
                task.add_done_callback(_attaching.discard)
                return
        logger.debug("no worker holds %s: it closes with its process", buffer)

    loop.call_soon(attach)


async def dask_setup(worker: Worker) -> None:
    """The preload: ``distributed.worker.preload: [diskpages.dask]`` in dask's
    configuration, ``LocalCluster(preload=["diskpages.dask"])``, or ``dask worker --preload
    diskpages.dask``. Replaces the SpillBuffer distributed made for the worker with one of
    ours, with the same target and max_spill (what ``memory_limit`` and
    ``distributed.worker.memory.target``, ``.spill`` and ``.max-spill`` gave it); the memory
    monitor (``.spill``, ``.pause``) works on it as on distributed's. A worker that
    distributed gave no SpillBuffer (no memory limit, or target and spill both False)
    spills nothing, as without the preload; one given ``data=`` keeps what it was given.
    """
    from distributed import Worker

    if not isinstance(worker, Worker):
        raise TypeError(
            f"diskpages.dask is a worker preload (distributed.worker.preload), not a "
            f"{type(worker).__name__}'s"
        )
    theirs = worker.data
    if isinstance(theirs, SpillBuffer):  # given through data=
        await _close_with(worker, theirs)
        return
    if type(theirs) is not _DistributedSpillBuffer:
        # no memory limit (or target and spill both False), or data= gave it another mapping
        logger.info("diskpages.dask: worker %s has no SpillBuffer to replace", worker.name)
        return
    if len(theirs) or worker.state.data is not theirs:
        raise RuntimeError(
            "diskpages.dask: the worker's data is in use or not where diskpages expects it; "
            "the preload must run at the worker's start (distributed.worker.preload)"
        )
    ours = SpillBuffer(
        worker_local_directory=worker.local_directory,
        target=int(theirs.n),
        max_spill=worker.memory_manager.max_spill,
    )
    worker.memory_manager.data = worker.state.data = ours
    await _close_with(worker, ours)
