/* A cache's life: open (start the reaper), close (stop it, empty the folder), free. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* Whether a nameless file made here can be given a name: O_TMPFILE needs the file
 * system's support, and linkat needs /proc (or CAP_DAC_READ_SEARCH). Tried once per
 * cache, so that a write never finds out halfway. */
static bool tmpfile_links(int dirfd)
{
    int fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0)
        return false;
    char proc[48];
    snprintf(proc, sizeof proc, "/proc/thread-self/fd/%d", fd);
    const char *probe = ".probe";
    bool ok = linkat(AT_FDCWD, proc, dirfd, probe, AT_SYMLINK_FOLLOW) == 0 ||
              linkat(fd, "", dirfd, probe, AT_EMPTY_PATH) == 0;
    if (ok)
        unlinkat(dirfd, probe, 0);
    close(fd);
    return ok;
}

static int cache_open(int dirfd, int rootfd, const char *name, int sync, unsigned batch,
                      uint64_t max_delay_ns, int remover, uint64_t max_bytes, uint64_t pack_max,
                      dp_hold *out);
static void cache_free(dp_cache *c);

int dp_cache_open(int dirfd, int sync, unsigned batch, uint64_t max_delay_ns, int remover,
                  uint64_t max_bytes, uint64_t pack_max, dp_hold *out)
{
    return cache_open(dirfd, -1, NULL, sync, batch, max_delay_ns, remover, max_bytes, pack_max,
                      out);
}

/* A new cache folder's name: "<pid>-<created, hex seconds>-<random>" (_folders.py reads it) */
static int folder_name(char *name)
{
    uint32_t random;
    ssize_t n;
    do
        n = getrandom(&random, sizeof random, 0);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof random)
        return n < 0 ? -errno : -EIO;
    snprintf(name, DP_NAME_MAX, "%d-%08x-%08x", (int)getpid(),
             (unsigned)((uint64_t)time(NULL) & 0xFFFFFFFFu), (unsigned)random);
    return 0;
}

/* Make the folder under the root (0700) and lock it (flock, exclusive: "this folder's cache
 * is alive", for the sweep), under the root's lock taken shared, so that no sweep picks it
 * between the mkdir and the lock. Its locked fd, or -errno with nothing left behind. */
static int make_folder(int rootfd, char *name)
{
    int err = 0, fd = -1;
    if (flock(rootfd, LOCK_SH) != 0)
        return -errno;
    for (;;) {
        if ((err = folder_name(name)))
            break;
        if (mkdirat(rootfd, name, 0700) == 0)
            break;
        if (errno != EEXIST) {
            err = -errno;
            break;
        }
    }
    if (!err) {
        fd = openat(rootfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0) { /* ours: nobody else can hold it */
            err = -errno;
            if (fd >= 0)
                close(fd);
            fd = -1;
            unlinkat(rootfd, name, AT_REMOVEDIR);
        }
    }
    flock(rootfd, LOCK_UN);
    return err ? err : fd;
}

int dp_cache_create(int rootfd, int sync, unsigned batch, uint64_t max_delay_ns, int remover,
                    uint64_t max_bytes, uint64_t pack_max, dp_hold *out, char *name)
{
    if (sync < DP_SYNC_NONE || sync > DP_SYNC_FULL || batch == 0 || max_delay_ns == 0 ||
        remover < DP_REMOVE_AUTO || remover > DP_REMOVE_URING || pack_max > DP_PACK_LIMIT)
        return -EINVAL; /* before any folder is made */
    /* the root's fd of our own, kept to remove the folder by at close */
    int root = fcntl(rootfd, F_DUPFD_CLOEXEC, 0);
    if (root < 0)
        return -errno;
    int dirfd = make_folder(root, name);
    if (dirfd < 0) {
        close(root);
        return dirfd;
    }
    int err = cache_open(dirfd, root, name, sync, batch, max_delay_ns, remover, max_bytes,
                         pack_max, out);
    if (err) {
        close(dirfd);
        unlinkat(root, name, AT_REMOVEDIR);
        close(root);
    }
    return err;
}

static int cache_open(int dirfd, int rootfd, const char *name, int sync, unsigned batch,
                      uint64_t max_delay_ns, int remover, uint64_t max_bytes, uint64_t pack_max,
                      dp_hold *out)
{
    if (sync < DP_SYNC_NONE || sync > DP_SYNC_FULL || batch == 0 || max_delay_ns == 0 ||
        remover < DP_REMOVE_AUTO || remover > DP_REMOVE_URING || pack_max > DP_PACK_LIMIT)
        return -EINVAL;
    dp_cache *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    int err = 0;
    atomic_init(&c->refs, 1); /* the hold's */
    /* what records (record.c) call back into when the hold lets go, and at the last put */
    c->close_locked = dp_close_locked;
    c->free_cache = cache_free;
    c->dirfd = dirfd;
    c->rootfd = rootfd;
    if (name)
        memcpy(c->name, name, DP_NAME_MAX);
    c->owner = dp_pid();
    c->sync = sync;
    c->batch = batch;
    c->max_delay_ns = max_delay_ns;
    c->max_bytes = max_bytes;
    atomic_init(&c->next_id, 1);
    atomic_init(&c->released, NULL);
    atomic_init(&c->released_slots, NULL);
    c->pack_max = pack_max;
    dp_segments_init(c);
    /* DISKPAGES_TMPFILE=0 takes the path of file systems without O_TMPFILE (for tests) */
    const char *tmpfile = getenv("DISKPAGES_TMPFILE");
    atomic_init(&c->tmpfile, !(tmpfile && strcmp(tmpfile, "0") == 0) && tmpfile_links(dirfd));

    c->scratch = malloc(sizeof *c->scratch);
    if (!c->scratch) {
        err = -ENOMEM;
        goto fail_alloc;
    }
    c->remover = dp_remover_new(remover);
    if (!c->remover) {
        err = -ENOMEM;
        goto fail_scratch;
    }
    atomic_init(&c->remover_kind, dp_remover_kind(c->remover));
    pthread_rwlockattr_t rwattr;
    pthread_rwlockattr_init(&rwattr);
    pthread_rwlockattr_setkind_np(&rwattr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    err = -pthread_rwlock_init(&c->closing, &rwattr);
    pthread_rwlockattr_destroy(&rwattr);
    if (err)
        goto fail_remover;
    if ((err = -pthread_mutex_init(&c->close_lock, NULL)))
        goto fail_rwlock;
    if ((err = -pthread_mutex_init(&c->drain_lock, NULL)))
        goto fail_close_lock;
    if ((err = -pthread_mutex_init(&c->lock, NULL)))
        goto fail_drain_lock;
    pthread_condattr_t attr;
    if ((err = -pthread_condattr_init(&attr)))
        goto fail_lock;
    /* CLOCK_MONOTONIC: a wall-clock jump must not stall or hurry the reaper. */
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    err = -pthread_cond_init(&c->wake, &attr);
    pthread_condattr_destroy(&attr);
    if (err)
        goto fail_lock;
    /* The reaper takes no signal: the process's handlers belong to its own threads, and a
     * signal landing here would only cut short the reaper's unlinks. It inherits the mask
     * of the thread that creates it. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    err = -pthread_create(&c->reaper, NULL, dp_reaper_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err)
        goto fail_cond;
    c->reaper_started = true;
    /* Return only once the reaper runs: a thread still starting up allocates (its TLS, the
     * sanitizers' per-thread state), and a fork meanwhile would leave the child an
     * allocator lock that nobody will release (glibc's malloc guards fork; AddressSanitizer's
     * allocator, in gcc 12, does not). */
    pthread_mutex_lock(&c->lock);
    while (!c->reaper_running)
        pthread_cond_wait(&c->wake, &c->lock);
    pthread_mutex_unlock(&c->lock);
    out->ptr = c;
    return 0;

fail_cond:
    pthread_cond_destroy(&c->wake);
fail_lock:
    pthread_mutex_destroy(&c->lock);
fail_drain_lock:
    pthread_mutex_destroy(&c->drain_lock);
fail_close_lock:
    pthread_mutex_destroy(&c->close_lock);
fail_rwlock:
    pthread_rwlock_destroy(&c->closing);
fail_remover:
    dp_remover_free(c->remover);
fail_scratch:
    free(c->scratch);
fail_alloc:
    dp_segments_free(c);
    free(c);
    return err; /* dirfd stays the caller's on failure */
}

/* The handed names still in the folder, and their bytes; the others are forgotten. The
 * caller holds `closing` shared (so the folder's fd stays open) in the owning process. */
static void count_handed(dp_cache *c, dp_stats *out)
{
    pthread_mutex_lock(&c->lock);
    for (size_t i = 0; i < c->nhanded;) {
        struct stat st;
        int rc = fstatat(c->dirfd, c->handed[i], &st, AT_SYMLINK_NOFOLLOW);
        if (rc != 0 && errno == ENOENT) {
            free(c->handed[i]); /* adopted: its receiver unlinked it */
            c->handed[i] = c->handed[--c->nhanded];
            continue;
        }
        out->handed++;
        if (rc == 0)
            out->handed_bytes += (uint64_t)st.st_size;
        i++;
    }
    pthread_mutex_unlock(&c->lock);
}

static void forget_handed(dp_cache *c)
{
    for (size_t i = 0; i < c->nhanded; i++)
        free(c->handed[i]);
    free(c->handed);
    c->handed = NULL;
    c->nhanded = c->handed_cap = 0;
}

void dp_cache_stats(dp_hold *h, dp_stats *out)
{
    memset(out, 0, sizeof *out);
    dp_cache *c = dp_hold_enter(h, dp_cache_let_go);
    if (!c)
        return; /* let go of: closed, nothing live */
    bool closed = atomic_load(&c->closed);
    /* The causes before the counts: each is added after its release is counted, so they
     * never add up to more than the releases loaded after them. */
    out->released_by_gc = atomic_load(&c->released_by[BY_GC]);
    out->released_explicitly = atomic_load(&c->released_by[BY_CALL]);
    uint64_t after_close = atomic_load(&c->released_after_close);
    struct dp_counts n;
    dp_counts(c, &n); /* (loads not one instant: charged_bytes, one load, is the budget's) */
    out->live_pages = n.live;
    out->live_bytes = n.live_bytes;
    out->live_disk_bytes = n.live_disk;
    out->pending = n.pending;
    out->pending_bytes = n.pending_bytes;
    out->pending_disk_bytes = n.pending_disk;
    out->removed = atomic_load(&c->removed);
    out->remove_errors = atomic_load(&c->remove_errors);
    out->written = atomic_load(&c->counts.written.pages);
    out->released_by_refcount = atomic_load(&c->counts.released.pages) - after_close -
                                out->released_by_gc - out->released_explicitly;
    out->charged_bytes = atomic_load(&c->charged);
    out->pinned = atomic_load(&c->pinned);
    out->pinned_bytes = atomic_load(&c->pinned_bytes);
    out->released_at_close = 0;
    if (closed) {
        /* Close removed every file: nothing is live or pending any more, and every page not
         * released before close counts as released at close (releases after close are not
         * counted by cause, so this is exact once close has returned). */
        out->released_at_close = out->written - out->released_by_refcount -
                                 out->released_by_gc - out->released_explicitly;
        out->live_pages = out->live_bytes = out->pending = out->pending_bytes = 0;
        out->charged_bytes = out->pinned = out->pinned_bytes = 0;
        out->live_disk_bytes = out->pending_disk_bytes = 0;
    }
    out->remover = c->remover_kind;
    /* not in a forked child (the locks may be held by a thread that did not come along),
     * and not once closed: the folder's fd is gone, and so are the names */
    if (dp_pid() == c->owner && !closed) {
        pthread_rwlock_rdlock(&c->closing);
        if (!atomic_load(&c->closed))
            count_handed(c, out);
        pthread_rwlock_unlock(&c->closing);
    }
    dp_hold_leave(h, dp_cache_let_go);
}

uint64_t dp_charge_for(dp_hold *h, uint64_t nbytes, int pack)
{
    dp_cache *c = dp_hold_enter(h, dp_cache_let_go);
    uint64_t charge = dp_disk_bytes(c, nbytes, pack != 0); /* let go of: a file's */
    if (c)
        dp_hold_leave(h, dp_cache_let_go);
    return charge;
}

static void stop_reaper(dp_cache *c)
{
    if (!c->reaper_started)
        return;
    pthread_mutex_lock(&c->lock);
    __atomic_store_n(&c->stop, true, __ATOMIC_RELAXED); /* the trim reads it unlocked */
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->reaper, NULL);
    c->reaper_started = false;
}

/* Remove every entry of the folder open at dirfd. Readdir while unlinking may skip entries,
 * so scan until a pass removes nothing. Returns how many went, or the first -errno of the
 * last pass (0 errors means the folder ended empty). */
int64_t dp_empty_dir(dp_remover *r, int dirfd)
{
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        int err = -errno;
        close(fd);
        return err;
    }
    /* On the heap: 256 names of up to 256 bytes would not fit a small thread's stack. */
    enum { CHUNK = 256 };
    struct {
        char names[CHUNK][NAME_MAX + 1];
        char *ptrs[CHUNK];
        int results[CHUNK];
    } *buf = malloc(sizeof *buf);
    if (!buf) {
        closedir(dir);
        return -ENOMEM;
    }
    char(*names)[NAME_MAX + 1] = buf->names;
    char **ptrs = buf->ptrs;
    int *results = buf->results;
    int first_error = 0;
    int64_t total = 0;
    for (;;) {
        size_t removed = 0, n = 0;
        rewinddir(dir);
        for (;;) {
            errno = 0;
            struct dirent *e = readdir(dir);
            if (!e && errno && !first_error)
                first_error = -errno;
            if (e && (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0))
                continue;
            if (e) {
                /* d_name holds at most NAME_MAX (255) bytes and its NUL */
                memcpy(names[n], e->d_name, strnlen(e->d_name, NAME_MAX) + 1);
                ptrs[n] = names[n];
                n++;
            }
            if (n == CHUNK || (!e && n)) {
                dp_remove_names(r, dirfd, ptrs, n, results);
                for (size_t i = 0; i < n; i++) {
                    if (results[i] == 0 || results[i] == -ENOENT)
                        removed++;
                    else if (!first_error)
                        first_error = results[i];
                }
                n = 0;
            }
            if (!e)
                break;
        }
        total += (int64_t)removed;
        if (removed == 0)
            break;
        first_error = 0; /* a pass that removed something may have cleared the error */
    }
    closedir(dir);
    free(buf);
    return first_error ? first_error : total;
}

int64_t dp_empty_folder(int dirfd)
{
    dp_remover *r = dp_remover_new(DP_REMOVE_AUTO);
    if (!r)
        return -ENOMEM;
    int64_t n = dp_empty_dir(r, dirfd);
    dp_remover_free(r);
    return n;
}

int dp_close_locked(dp_cache *c)
{
    if (dp_pid() != c->owner) {
        /* a forked child: the locks may be held by a thread that did not come along */
        atomic_store(&c->closed, true);
        return -DP_EFORKED;
    }
    pthread_mutex_lock(&c->close_lock); /* a second close waits for the first */
    /* Mark closed first, so new writers and readers turn back at once; then wait for the
     * ones in flight (the lock prefers writers, so a stream of them cannot starve us). */
    if (!atomic_exchange(&c->closed, true)) {
        pthread_rwlock_wrlock(&c->closing);
        pthread_rwlock_unlock(&c->closing);
        stop_reaper(c);
    }
    /* Every call empties the folder again, so a close that failed (a file that could not
     * be removed) can be retried once the cause is fixed. Once it is empty, the fds go:
     * no reader or writer can use them any more (they check `closed` under the lock). */
    pthread_mutex_lock(&c->drain_lock);
    int64_t n = 0;
    if (c->dirfd >= 0) {
        dp_drain_locked(c);
        dp_poll_viewed(c, true); /* closed: nothing is counted any more */
        n = dp_empty_dir(c->remover, c->dirfd);
        /* the folder itself, where this cache made it (dp_cache_create); ENOENT: removed
         * under us, which is what close wants anyway */
        if (n >= 0 && c->rootfd >= 0 && unlinkat(c->rootfd, c->name, AT_REMOVEDIR) != 0 &&
            errno != ENOENT)
            n = -errno;
        if (n >= 0) {
            dp_segments_close(c);
            close(c->dirfd);
            c->dirfd = -1;
            if (c->rootfd >= 0)
                close(c->rootfd);
            c->rootfd = -1;
            dp_remover_free(c->remover);
            c->remover = NULL;
        }
    }
    pthread_mutex_unlock(&c->drain_lock);
    pthread_mutex_unlock(&c->close_lock);
    return n < 0 ? (int)n : 0;
}

int dp_cache_close(dp_hold *h)
{
    dp_cache *c = dp_hold_enter(h, dp_cache_let_go);
    if (!c)
        return 0; /* let go of: it was closed then */
    int err = dp_close_locked(c);
    dp_hold_leave(h, dp_cache_let_go);
    return err;
}

/* The last reference: every record is gone (each held one), and the hold let go after
 * closing, so the reaper is stopped and the queue empty. */
static void cache_free(dp_cache *c)
{
    if (dp_pid() == c->owner) {
        pthread_cond_destroy(&c->wake);
        pthread_mutex_destroy(&c->lock);
        pthread_mutex_destroy(&c->drain_lock);
        pthread_mutex_destroy(&c->close_lock);
        pthread_rwlock_destroy(&c->closing);
    }
    /* In a forked child the locks may be held by a thread that is gone: touch none, and
     * close our copies of the fds, which close() left alone. */
    if (c->remover)
        dp_remover_free(c->remover);
    forget_handed(c);
    free(c->viewed); /* (a forked child's copy: close, in the parent, let go of the records) */
    dp_segments_free(c);
    if (c->dirfd >= 0)
        close(c->dirfd);
    if (c->rootfd >= 0)
        close(c->rootfd);
    free(c->scratch);
    free(c);
}

void dp_cache_drop(dp_hold *h)
{
    if (dp_hold_drop(h))
        dp_cache_let_go(h->ptr);
}
