"""For the cluster tests of tests/test_dask.py: make distributed say so, as a WARNING of
``distributed.diskutils`` (the logger of its folder removal), when it starts removing a
worker's folder while a live spill cache is still in it.

That is the moment the cache's reaper and distributed's ``rmtree`` can meet: the reaper
removes a released page that the walk has listed, and distributed logs "Failed to remove
... No such file or directory". Whether they do meet depends on timing; this makes the
condition itself show, every time. A process worker loads it as a preload (a ``.py``
path in ``preload=``); a test with thread workers wraps ``WorkSpace._purge_directory``
with ``spying()`` itself.
"""

import logging
import os

from distributed.diskutils import WorkSpace

from diskpages._folders import list_folders


def spying(purge):
    def _purge_directory(self, dir_path):
        storage = os.path.join(dir_path, "storage")
        if os.path.isdir(storage):
            live = [info.path.name for info in list_folders(storage) if info.alive]
            if live:
                logging.getLogger("distributed.diskutils").warning(
                    "removing %s while the spill cache folders %s in it are still open", dir_path, live
                )
        return purge(self, dir_path)

    return _purge_directory


def dask_setup(worker):
    if not getattr(WorkSpace, "_spied", False):
        WorkSpace._purge_directory = spying(WorkSpace._purge_directory)
        WorkSpace._spied = True
