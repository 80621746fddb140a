"""The floor: the same system calls diskpages makes, in a bare C loop, built with cffi for
the benchmark suite only (never shipped). Compiled once per checkout into benchmarks/.build."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"

CDEF = """
int floor_write(int dirfd, int start, int count, const void *data, size_t nbytes, int sync);
int floor_unlink(int dirfd, int start, int count);
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

/* openat(O_CREAT|O_EXCL) + pwrite + [fdatasync] + close + [fsync(dir)] per file */
int floor_write(int dirfd, int start, int count, const void *data, size_t nbytes, int sync)
{
    char name[32];
    for (int i = start; i < start + count; i++) {
        snprintf(name, sizeof name, "%d.page", i);
        int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
            return -errno;
        size_t off = 0;
        while (off < nbytes) {
            ssize_t n = pwrite(fd, (const char *)data + off, nbytes - off, (off_t)off);
            if (n < 0) { close(fd); return -errno; }
            off += (size_t)n;
        }
        if (sync >= 1 && fdatasync(fd) != 0) { close(fd); return -errno; }
        if (close(fd) != 0)
            return -errno;
        if (sync == 2 && fsync(dirfd) != 0)
            return -errno;
    }
    return 0;
}

int floor_unlink(int dirfd, int start, int count)
{
    char name[32];
    for (int i = start; i < start + count; i++) {
        snprintf(name, sizeof name, "%d.page", i);
        if (unlinkat(dirfd, name, 0) != 0)
            return -errno;
    }
    return 0;
}
"""


def load():
    """The compiled floor module (built on first use)."""
    BUILD.mkdir(exist_ok=True)
    if str(BUILD) not in sys.path:
        sys.path.insert(0, str(BUILD))
    try:
        return importlib.import_module("_dp_floor")
    except ImportError:
        ffi = FFI()
        ffi.cdef(CDEF)
        ffi.set_source("_dp_floor", SOURCE, extra_compile_args=["-O2", "-Wall", "-Wextra"])
        ffi.compile(tmpdir=str(BUILD))
        return importlib.import_module("_dp_floor")
