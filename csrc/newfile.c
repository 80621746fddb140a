/* A new page's file: its record and budget charge, the file made without a name (or as
 * "<id>.part"), then named in the folder and published (counted live). Anything that fails
 * before publishing is discarded: its file unlinked, its charge given back.
 *
 * Below the writes (write.c), which fill the file in between; it calls records, segments
 * and the reaper's wake-up, never a write. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define CREATE_FLAGS (O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW)

void dp_discard_page(dp_cache *c, dp_page *rec)
{
    if (rec->cls >= 0) { /* a slot: back to the free bitmap */
        dp_discard_slot(c, rec);
        free(rec);
        dp_cache_put(c);
        return;
    }
    /* Either name may exist, depending on how far the page got; ENOENT is the usual case. */
    char name[DP_NAME_MAX];
    dp_page_name(rec->id, name);
    unlinkat(c->dirfd, name, 0);
    if (rec->part) {
        dp_part_name(rec->id, name);
        unlinkat(c->dirfd, name, 0);
    }
    if (rec->fd >= 0)
        close(rec->fd);
    free(rec);
    dp_cache_put(c);
}

/* A new record and its new, still nameless file: the fd, or -errno with nothing left
 * behind. O_TMPFILE makes the file in the cache's folder without a name, so a process killed
 * while it writes leaves nothing and no reader ever sees a page half written: link_page
 * names it once it is whole. Where the file system has no O_TMPFILE, the file is made as
 * "<id>.part" and renamed instead (readers and the sweep ignore the name until then). */
dp_page *dp_new_record(dp_cache *c, size_t nbytes)
{
    dp_page *p = malloc(sizeof *p);
    if (!p)
        return NULL;
    p->next = NULL;
    p->cache = c;
    p->id = atomic_fetch_add(&c->next_id, 1);
    p->nbytes = nbytes;
    p->charge = dp_disk_bytes(c, nbytes, false); /* a file's, unless it becomes a slot */
    p->part = false;
    p->fd = -1;
    p->cls = -1;
    p->slot = 0;
    atomic_init(&p->refs, 2);
    atomic_init(&p->released, false);
    atomic_init(&p->shared, false);
    p->dev = p->ino = 0;
    atomic_init(&p->pins, 1);
    return p;
}

/* A new file in the cache's folder, without a name (O_TMPFILE), or where the file system
 * has none, named `name` (*named says which): the fd, or -1 with errno set. */
int dp_open_nameless(dp_cache *c, int access, const char *name, bool *named)
{
    int fd = -1;
    *named = false;
    if (atomic_load_explicit(&c->tmpfile, memory_order_relaxed)) {
        do
            fd = openat(c->dirfd, ".", O_TMPFILE | O_CLOEXEC | access, 0600);
        while (fd < 0 && errno == EINTR);
        /* EOPNOTSUPP (file system), EISDIR (kernel before 3.11): never try again */
        if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR))
            atomic_store_explicit(&c->tmpfile, false, memory_order_relaxed);
    }
    if (fd < 0 && !atomic_load_explicit(&c->tmpfile, memory_order_relaxed)) {
        do
            fd = openat(c->dirfd, name, CREATE_FLAGS | access, 0600);
        while (fd < 0 && errno == EINTR);
        *named = fd >= 0;
    }
    return fd;
}

int dp_open_new_page(dp_cache *c, size_t nbytes, int access, dp_page **out)
{
    dp_page *p = dp_new_record(c, nbytes);
    if (!p)
        return -ENOMEM;

    char part[DP_NAME_MAX];
    dp_part_name(p->id, part);
    int fd = dp_open_nameless(c, access, part, &p->part);
    if (fd < 0) {
        int err = -errno;
        struct stat st;
        /* a folder removed under us: O_TMPFILE says EPERM there, a named create ENOENT */
        if (fstat(c->dirfd, &st) == 0 && st.st_nlink == 0)
            err = -ENOENT;
        free(p);
        return err;
    }
    dp_cache_get(c); /* the record's reference, put when the record is freed */
    *out = p;
    return fd;
}

/* Give the file open at fd the name `name` in the cache's folder (a nameless file, or
 * another name of a file with one). */
int dp_link_fd(dp_cache *c, int fd, const char *name)
{
    /* linkat(fd, "", AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH on most kernels; the /proc
     * link is the documented way for everyone else (open(2), O_TMPFILE). thread-self, not
     * self: /proc/self is the thread-group leader's fd table, which a thread that has its
     * own (unshare(CLONE_FILES)) does not share, so fd N there is another file. */
    char proc[48];
    snprintf(proc, sizeof proc, "/proc/thread-self/fd/%d", fd);
    if (linkat(AT_FDCWD, proc, c->dirfd, name, AT_SYMLINK_FOLLOW) == 0)
        return 0;
    int err = -errno;
    if (err == -ENOENT && linkat(fd, "", c->dirfd, name, AT_EMPTY_PATH) == 0)
        return 0; /* no /proc mounted */
    return err;
}

/* Give a whole page its name. */
int dp_link_page(dp_cache *c, dp_page *p, int fd)
{
    char name[DP_NAME_MAX];
    dp_page_name(p->id, name);
    if (p->part) {
        char part[DP_NAME_MAX];
        dp_part_name(p->id, part);
        if (renameat(c->dirfd, part, c->dirfd, name) != 0)
            return -errno;
        p->part = false; /* its name is the page's now, for the removal too */
        return 0;
    }
    return dp_link_fd(c, fd, name);
}

void dp_publish(dp_cache *c, dp_page *p)
{
    dp_count_add(&c->counts.written, p);
    /* it sleeps without a timeout while nothing is live or pending: wake it then only */
    if (atomic_load(&c->idle))
        dp_wake_reaper(c);
}

int dp_sync_folder(dp_cache *c)
{
    if (c->sync != DP_SYNC_FULL)
        return 0;
    return fsync(c->dirfd) == 0 ? 0 : -errno;
}

int dp_enter_write(dp_cache *c)
{
    /* A forked child has no reaper and shares our ids with its parent: it must not make
     * pages in the parent's folder. Checked before any lock, which the parent's threads
     * may have held at fork time. */
    if (dp_pid() != c->owner)
        return -DP_EFORKED;
    pthread_rwlock_rdlock(&c->closing);
    if (atomic_load(&c->closed)) {
        pthread_rwlock_unlock(&c->closing);
        return -DP_ECLOSED;
    }
    return 0;
}
