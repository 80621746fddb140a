"""``diskpages.dask.SpillBuffer``: a drop-in for ``distributed.spill.SpillBuffer`` whose
spilled values are pages (``diskpages.zict.File``), so that deleting a spilled key costs
the worker's event loop a release, not an ``os.remove``.

Wire it into a cluster with ``data=``; the worker then passes its own folder, and spills go
under ``<worker local directory>/storage`` as with distributed's own::

    LocalCluster(memory_limit="2 GiB",
                 data=(diskpages.dask.SpillBuffer, {"target": int(0.6 * 2 * 2**30)}))

Everything a worker and its memory manager see is distributed's SpillBuffer: ``fast``,
``slow``, ``evict()``, ``spilled_total``, ``cumulative_metrics``, ``max_spill``, and a full
disk keeping the key in memory. Only the store under it differs (``self.file``). The worker
closes the buffer (its pages and folder removed) before it removes its own folder. Needs
distributed (``pip install "diskpages[dask]"``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Literal

import zict
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.spill import SpillBuffer as _DistributedSpillBuffer

from .zict import File

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["SpillBuffer", "SpillFile"]

logger = logging.getLogger(__name__)

#: The worker plugin that closes a worker's SpillBuffer when the worker closes.
PLUGIN_NAME = "diskpages.dask"


class SpillFile(File):
    """``diskpages.zict.File`` for dask keys: any hashable key (str, tuple...), as
    distributed's own spill file takes."""

    def _check_key(self, key: object) -> None:
        if not isinstance(key, Hashable):
            raise TypeError(f"keys must be hashable, not {type(key).__name__}")


class SpillBuffer(_DistributedSpillBuffer):
    """distributed's SpillBuffer, spilling to pages.

    ``spill_directory``, ``target`` and ``max_spill`` mean what they mean there. Given
    ``worker_local_directory`` instead of ``spill_directory`` (a worker passes it when built
    through ``data=(SpillBuffer, {...})``), spills go under ``<it>/storage``, removed with
    the worker's folder by dask, and the buffer is closed by its worker when the worker
    closes, before the folder is removed. ``cache_options`` go to the PageCache
    (``self.file.cache``); ``collect_when_full`` is False unless given, so that a
    ``max_bytes`` reached raises in the event loop's thread (the key stays in memory)
    instead of running the cycle collector there.
    """

    def __init__(
        self,
        spill_directory: str | os.PathLike[str] | None = None,
        target: int | None = None,
        max_spill: int | Literal[False] = False,
        *,
        worker_local_directory: str | None = None,
        **cache_options: Any,
    ) -> None:
        if spill_directory is None:
            if worker_local_directory is None:
                raise TypeError("SpillBuffer needs spill_directory (or a worker's worker_local_directory)")
            spill_directory = os.path.join(worker_local_directory, "storage")
        if target is None:
            raise TypeError("SpillBuffer needs target: the bytes of managed memory to start spilling at")
        spill_directory = os.fspath(spill_directory)
        # Made private before distributed's own File makes it with the umask's mode (775
        # under umask 002), which PageCache would refuse as a root others can write to.
        os.makedirs(spill_directory, mode=0o700, exist_ok=True)
        super().__init__(spill_directory, target, max_spill)
        cache_options.setdefault("collect_when_full", False)
        self.file = SpillFile(spill_directory, **cache_options)
        self._closed = False
        self._swap_store(self.file)
        if worker_local_directory is not None:
            _close_with_worker_soon(self, worker_local_directory)

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
