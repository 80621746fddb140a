"""C helpers for the benchmark suite, built with cffi (never shipped), compiled once per
version of this file into benchmarks/.build:

- the floor: the system calls a write or a removal needs, in a bare C loop. Two floors
  write: the plain one (openat(O_CREAT|O_EXCL) + pwrite + close) and the one diskpages
  uses when pages are born nameless (open(O_TMPFILE) + pwrite + linkat + close); both do
  fdatasync for sync="data" and also fsync the folder for sync="full".
- the churn floors: a window of live pages in which each step writes one page and drops
  the oldest, in a bare C loop, either a file per page (openat(O_CREAT|O_EXCL) + pwrite +
  close, unlinkat of the oldest) or slots in one preallocated segment file (pwrite into the
  oldest page's slot, reused in place: no create, no unlink).
- a file-event recorder: a pthread that reads inotify events of one folder and stamps each
  with CLOCK_MONOTONIC (the clock of time.perf_counter_ns), so the cleanup benchmarks learn
  when each page's file appeared and went without polling and without the GIL. It asks
  for SCHED_FIFO (granted to root) so that a busy machine does not delay its stamps.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"

CDEF = """
int floor_write(int dirfd, int start, int count, const void *data, size_t nbytes, int sync);
int floor_write_tmpfile(int dirfd, int start, int count, const void *data, size_t nbytes, int sync);
int floor_unlink(int dirfd, int start, int count);
int floor_churn_files(int dirfd, int start, int count, int window, const void *data, size_t nbytes);
int floor_churn_slots(int fd, long long start, int count, int window, const void *data, size_t nbytes,
                      size_t slot);

typedef struct { int64_t t_ns; int32_t kind; char name[44]; } watch_event;
typedef struct watcher watcher;
watcher *watch_start(const char *folder, watch_event *events, size_t capacity, int *realtime);
int64_t watch_stop(watcher *w, int *overflowed);
"""

SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <time.h>
#include <unistd.h>

static int write_all_at(int fd, const void *data, size_t nbytes, off_t at)
{
    size_t off = 0;
    while (off < nbytes) {
        ssize_t n = pwrite(fd, (const char *)data + off, nbytes - off, at + (off_t)off);
        if (n < 0)
            return -errno;
        off += (size_t)n;
    }
    return 0;
}

static int write_all(int fd, const void *data, size_t nbytes)
{
    return write_all_at(fd, data, nbytes, 0);
}

/* openat(O_CREAT|O_EXCL) + pwrite + [fdatasync] + close + [fsync(dir)] per file */
int floor_write(int dirfd, int start, int count, const void *data, size_t nbytes, int sync)
{
    char name[32];
    for (int i = start; i < start + count; i++) {
        snprintf(name, sizeof name, "%d.page", i);
        int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
            return -errno;
        int err = write_all(fd, data, nbytes);
        if (!err && sync >= 1 && fdatasync(fd) != 0)
            err = -errno;
        if (close(fd) != 0 && !err)
            err = -errno;
        if (!err && sync == 2 && fsync(dirfd) != 0)
            err = -errno;
        if (err)
            return err;
    }
    return 0;
}

/* open(O_TMPFILE) + pwrite + [fdatasync] + linkat + close + [fsync(dir)] per file: the page
 * gets its name only once its bytes are in */
int floor_write_tmpfile(int dirfd, int start, int count, const void *data, size_t nbytes, int sync)
{
    char name[32], proc[40];
    for (int i = start; i < start + count; i++) {
        int fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
        if (fd < 0)
            return -errno;
        int err = write_all(fd, data, nbytes);
        if (!err && sync >= 1 && fdatasync(fd) != 0)
            err = -errno;
        if (!err) {
            snprintf(name, sizeof name, "%d.page", i);
            snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
            if (linkat(AT_FDCWD, proc, dirfd, name, AT_SYMLINK_FOLLOW) != 0)
                err = -errno;
        }
        if (close(fd) != 0 && !err)
            err = -errno;
        if (!err && sync == 2 && fsync(dirfd) != 0)
            err = -errno;
        if (err)
            return err;
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

/* Churn, a file per page: page i is the file "i.page"; each step makes page i (openat +
 * pwrite + close) and unlinks page i - window, the oldest of the window (pages start -
 * window .. start - 1 are there already, made by floor_write). */
int floor_churn_files(int dirfd, int start, int count, int window, const void *data, size_t nbytes)
{
    char name[32];
    for (int i = start; i < start + count; i++) {
        snprintf(name, sizeof name, "%d.page", i);
        int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
            return -errno;
        int err = write_all_at(fd, data, nbytes, 0);
        if (close(fd) != 0 && !err)
            err = -errno;
        if (err)
            return err;
        snprintf(name, sizeof name, "%d.page", i - window);
        if (unlinkat(dirfd, name, 0) != 0)
            return -errno;
    }
    return 0;
}

/* Churn in slots: one segment file of `window` slots of `slot` bytes (preallocated by the
 * caller); page i goes into slot i % window, where the oldest page of the window was: the
 * oldest is dropped by being overwritten, its blocks reused in place. */
int floor_churn_slots(int fd, long long start, int count, int window, const void *data, size_t nbytes,
                      size_t slot)
{
    for (long long i = start; i < start + count; i++) {
        int err = write_all_at(fd, data, nbytes, (off_t)((i % window) * (long long)slot));
        if (err)
            return err;
    }
    return 0;
}

typedef struct { int64_t t_ns; int32_t kind; char name[44]; } watch_event;

typedef struct watcher {
    int ifd, stop[2];
    pthread_t thread;
    watch_event *events;
    size_t capacity, count;
    int overflowed;
} watcher;

static void take(watcher *w, const char *buf, ssize_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* one stamp per read: events arrive together */
    int64_t t = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    for (const char *p = buf; p < buf + len;) {
        const struct inotify_event *e = (const struct inotify_event *)p;
        p += sizeof *e + e->len;
        if (e->mask & IN_Q_OVERFLOW)
            w->overflowed = 1;
        if (!e->len)
            continue;
        int kind = 0; /* 1: the name appeared, 2: it went */
        if (e->mask & (IN_CREATE | IN_MOVED_TO))
            kind = 1;
        else if (e->mask & (IN_DELETE | IN_MOVED_FROM))
            kind = 2;
        else
            continue;
        if (w->count == w->capacity) {
            w->overflowed = 1;
            continue;
        }
        watch_event *out = &w->events[w->count++];
        out->t_ns = t;
        out->kind = kind;
        snprintf(out->name, sizeof out->name, "%s", e->name);
    }
}

static void *watch_loop(void *arg)
{
    watcher *w = arg;
    char buf[1 << 16] __attribute__((aligned(__alignof__(struct inotify_event))));
    struct pollfd fds[2] = {{w->ifd, POLLIN, 0}, {w->stop[0], POLLIN, 0}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents & POLLIN) { /* events before the stop request */
            ssize_t len = read(w->ifd, buf, sizeof buf);
            if (len > 0)
                take(w, buf, len);
            continue;
        }
        if (fds[1].revents & POLLIN)
            break;
    }
    ssize_t len; /* the queue is non-blocking: drain what is left */
    while ((len = read(w->ifd, buf, sizeof buf)) > 0)
        take(w, buf, len);
    return NULL;
}

/* *realtime: whether the thread got SCHED_FIFO, so that on a busy machine it still reads
 * (and stamps) each event within microseconds of the event */
watcher *watch_start(const char *folder, watch_event *events, size_t capacity, int *realtime)
{
    watcher *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->events = events;
    w->capacity = capacity;
    w->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->ifd < 0)
        goto fail_free;
    if (inotify_add_watch(w->ifd, folder, IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM) < 0)
        goto fail_ifd;
    if (pipe2(w->stop, O_CLOEXEC) != 0)
        goto fail_ifd;
    if (pthread_create(&w->thread, NULL, watch_loop, w) != 0)
        goto fail_pipe;
    struct sched_param param = {.sched_priority = 1};
    *realtime = pthread_setschedparam(w->thread, SCHED_FIFO, &param) == 0;
    return w;
fail_pipe:
    close(w->stop[0]);
    close(w->stop[1]);
fail_ifd:
    close(w->ifd);
fail_free:
    free(w);
    return NULL;
}

/* Stop, after every event already queued has been read; the number of events kept. */
int64_t watch_stop(watcher *w, int *overflowed)
{
    char c = 1;
    while (write(w->stop[1], &c, 1) < 0 && errno == EINTR)
        ;
    pthread_join(w->thread, NULL);
    int64_t n = (int64_t)w->count;
    *overflowed = w->overflowed;
    close(w->ifd);
    close(w->stop[0]);
    close(w->stop[1]);
    free(w);
    return n;
}
"""


def load():
    """The compiled module, built on first use; its name carries a hash of the C source so
    a stale build of an older version of this file is never imported."""
    name = "_dp_floor_" + hashlib.sha256((CDEF + SOURCE).encode()).hexdigest()[:12]
    BUILD.mkdir(exist_ok=True)
    if str(BUILD) not in sys.path:
        sys.path.insert(0, str(BUILD))
    try:
        return importlib.import_module(name)
    except ImportError:
        ffi = FFI()
        ffi.cdef(CDEF)
        ffi.set_source(
            name,
            SOURCE,  # Python.h, included first, defines _GNU_SOURCE (O_TMPFILE needs it)
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            libraries=["pthread"],
        )
        ffi.compile(tmpdir=str(BUILD))
        return importlib.import_module(name)


class Watcher:
    """Records when files ending in ".page" appear in and leave one folder (inotify, read by
    a C thread). ``stop()`` returns the events in the kernel's order as (ns, +1 appeared or
    -1 gone, page number), on time.perf_counter_ns's clock, and whether any were lost.
    Events read together share one stamp, so their order, not their stamps, says which
    came first."""

    def __init__(self, floor, folder, capacity: int):
        self.floor = floor
        self.events = floor.ffi.new("watch_event[]", capacity)
        realtime = floor.ffi.new("int *")
        self.handle = floor.lib.watch_start(str(folder).encode(), self.events, capacity, realtime)
        if self.handle == floor.ffi.NULL:
            raise OSError(f"could not watch {folder} with inotify")
        self.realtime = bool(realtime[0])

    def stop(self) -> tuple[list[tuple[int, int, int]], bool]:
        overflowed = self.floor.ffi.new("int *")
        n = self.floor.lib.watch_stop(self.handle, overflowed)
        self.handle = None
        events = []
        string = self.floor.ffi.string
        for i in range(n):
            ev = self.events[i]
            name = string(ev.name)
            if name.endswith(b".page"):
                events.append((ev.t_ns, 1 if ev.kind == 1 else -1, int(name[:-5])))
        self.events = None
        return events, bool(overflowed[0])
