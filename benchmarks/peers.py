"""Other ways to keep bytes in files, as write contenders: numpy.save, zict's File mapping,
diskcache's Cache, and a model of tablite's page store.

None of them has a sync knob (diskcache's ``sqlite_synchronous`` covers its database, not the
files that hold large values), so they are measured with sync="none" only. A peer that
cannot be imported is skipped with the reason (``missing_reason``), never silently.
"""

from __future__ import annotations

import importlib
import itertools
import os
from pathlib import Path

PEERS = ["numpy.save", "zict.File", "diskcache", "tablite model"]
_MODULES = {"numpy.save": "numpy", "zict.File": "zict", "diskcache": "diskcache", "tablite model": "numpy"}


def missing_reason(peer: str) -> str | None:
    """Why this peer cannot run here, or None if it can."""
    module = _MODULES[peer]
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{peer}: cannot import {module} ({e}); pip install '.[bench]'"
    return None


class TablitePage:
    """A MODEL of tablite's page store, written for this benchmark (not tablite's code):
    one .npy file per page written with numpy.save, a class-wide dict counting references
    per file, and ``__del__`` that decrements it and unlinks the file when it reaches zero,
    synchronously, in whatever code dropped the last page object."""

    refcounts: dict[Path, int] = {}
    ids = itertools.count()

    def __init__(self, folder: Path, array) -> None:
        import numpy

        self.path = folder / f"{next(self.ids)}.npy"
        numpy.save(self.path, array, allow_pickle=False)
        self.refcounts[self.path] = self.refcounts.get(self.path, 0) + 1

    def __del__(self) -> None:
        count = self.refcounts[self.path] - 1
        if count:
            self.refcounts[self.path] = count
        else:
            del self.refcounts[self.path]
            self.path.unlink()


class PeerWriter:
    """Writes ``n`` pages a round into a folder; ``drop()`` removes the previous round's.
    Subclasses fill in open/write/drop/close."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n = data, n
        self.folder: Path | None = None
        self.keys: list = []  # the pages of the current round

    def open(self, folder: Path) -> None:
        self.folder = folder

    def write(self, start: int) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NumpySave(PeerWriter):
    def open(self, folder):
        import numpy

        super().open(folder)
        self.array = numpy.frombuffer(self.data, dtype=numpy.uint8)

    def write(self, start):
        import numpy

        save, array, folder = numpy.save, self.array, str(self.folder)
        for i in range(start, start + self.n):
            path = f"{folder}/{i}.npy"
            save(path, array, allow_pickle=False)
            self.keys.append(path)

    def drop(self):
        for path in self.keys:
            os.unlink(path)
        self.keys = []


class ZictFile(PeerWriter):
    def open(self, folder):
        import zict

        super().open(folder)
        self.store = zict.File(str(folder))

    def write(self, start):
        store, data = self.store, self.data
        for i in range(start, start + self.n):
            key = str(i)
            store[key] = data
            self.keys.append(key)

    def drop(self):
        for key in self.keys:
            del self.store[key]  # removes the file
        self.keys = []


class Diskcache(PeerWriter):
    """diskcache.Cache.set per page. Values under its disk_min_file_size (32 KiB) go into
    its SQLite database, larger ones into files of their own. size_limit is raised so it
    keeps every page, as the other contenders do, instead of culling."""

    def open(self, folder):
        import diskcache

        super().open(folder)
        self.cache = diskcache.Cache(str(folder), size_limit=2**50)

    def write(self, start):
        cache_set, data = self.cache.set, self.data
        for i in range(start, start + self.n):
            cache_set(i, data)
            self.keys.append(i)

    def drop(self):
        delete = self.cache.delete
        for key in self.keys:
            delete(key)
        self.keys = []

    def close(self):
        self.cache.close()


class TabliteModel(PeerWriter):
    def open(self, folder):
        import numpy

        super().open(folder)
        self.array = numpy.frombuffer(self.data, dtype=numpy.uint8)

    def write(self, start):
        folder, array, keys = self.folder, self.array, self.keys
        for _ in range(self.n):
            keys.append(TablitePage(folder, array))

    def drop(self):
        self.keys = []  # the pages' __del__ unlink their files


PEER_CLASSES = {
    "numpy.save": NumpySave,
    "zict.File": ZictFile,
    "diskcache": Diskcache,
    "tablite model": TabliteModel,
}
