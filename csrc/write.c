/* Putting pages on disk: pwrite or a shared mapping, with the fsyncs the sync mode asks for.
 * A page is created and filled first, then published (counted live, handed to Python);
 * anything that fails before publishing unlinks the file, so a failure leaves nothing. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#define CREATE_FLAGS (O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW)

static void discard_page(dp_cache *c, dp_page *rec)
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
static dp_page *new_record(dp_cache *c, size_t nbytes)
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
static int open_nameless(dp_cache *c, int access, const char *name, bool *named)
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

static int open_new_page(dp_cache *c, size_t nbytes, int access, dp_page **out)
{
    dp_page *p = new_record(c, nbytes);
    if (!p)
        return -ENOMEM;

    char part[DP_NAME_MAX];
    dp_part_name(p->id, part);
    int fd = open_nameless(c, access, part, &p->part);
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
static int link_fd(dp_cache *c, int fd, const char *name)
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
static int link_page(dp_cache *c, dp_page *p, int fd)
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
    return link_fd(c, fd, name);
}

static void publish(dp_cache *c, dp_page *p)
{
    atomic_fetch_add(&c->live_bytes, p->nbytes);
    atomic_fetch_add(&c->live_disk_bytes, p->charge);
    atomic_fetch_add(&c->written, 1);
    if (atomic_fetch_add(&c->live_pages, 1) == 0)
        dp_wake_reaper(c); /* it sleeps without a timeout while nothing is live */
}

int dp_pwritev_all(int fd, struct iovec *iov, size_t count, off_t off)
{
    for (;;) {
        while (count && iov->iov_len == 0) { /* empty parts: nothing to write, skip them */
            iov++;
            count--;
        }
        if (!count)
            return 0;
        /* Linux writes at most 2 GiB a call, and takes at most IOV_MAX parts */
        ssize_t n = pwritev(fd, iov, count < IOV_MAX ? (int)count : IOV_MAX, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* no progress on a regular file: do not spin */
        off += n;
        for (size_t left = (size_t)n; left;) { /* drop what was written */
            size_t step = left < iov->iov_len ? left : iov->iov_len;
            iov->iov_base = (char *)iov->iov_base + step;
            iov->iov_len -= step;
            left -= step;
            if (iov->iov_len == 0) {
                iov++;
                count--;
            }
        }
    }
}

/* Every part from offset 0, then fdatasync if the sync mode asks. Consumes iov. */
static int writev_synced(dp_cache *c, int fd, struct iovec *iov, size_t count)
{
    int err = dp_pwritev_all(fd, iov, count, 0);
    if (!err && c->sync != DP_SYNC_NONE && fdatasync(fd) != 0)
        err = -errno;
    return err;
}

/* One buffer: the same loop (a one-part pwritev costs what pwrite does). */
static int write_synced(dp_cache *c, int fd, const char *data, size_t nbytes)
{
    struct iovec iov = {.iov_base = (void *)data, .iov_len = nbytes};
    return writev_synced(c, fd, &iov, 1);
}

/* Reserve the blocks so that a store through a mapping can never meet ENOSPC (which would
 * be SIGBUS, not an error). Returns -EOPNOTSUPP where the file system cannot. */
static int reserve(int fd, size_t nbytes)
{
    if (nbytes == 0)
        return 0;
    int err;
    do
        err = fallocate(fd, 0, 0, (off_t)nbytes) == 0 ? 0 : -errno;
    while (err == -EINTR);
    if (err == -ENOSYS)
        err = -EOPNOTSUPP;
    return err;
}

static int write_mapped(dp_cache *c, int fd, const void *data, size_t nbytes)
{
    if (nbytes == 0)
        return 0;
    int err = reserve(fd, nbytes);
    if (err == -EOPNOTSUPP) /* cannot reserve: do not risk SIGBUS, write it instead */
        return write_synced(c, fd, data, nbytes);
    if (err)
        return err;
    void *map = mmap(NULL, nbytes, PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return -errno;
    memcpy(map, data, nbytes);
    if (c->sync != DP_SYNC_NONE && msync(map, nbytes, MS_SYNC) != 0)
        err = -errno;
    munmap(map, nbytes);
    return err;
}

/* Create and fill one page (a slot, or a file of its own) from its parts, laid end to end;
 * not yet published. A slot is synced by the caller, once per segment (dp_sync_slots). */
static int create_page(dp_cache *c, const struct iovec *parts, size_t count, size_t nbytes,
                       int method, dp_page **out)
{
    dp_page *rec;
    int cls = dp_class_of(c, nbytes);
    if (cls >= 0) {
        if (!(rec = new_record(c, nbytes)))
            return -ENOMEM;
        int err = dp_write_slot(c, cls, parts, count, nbytes, rec);
        if (!err) {
            dp_cache_get(c); /* the record's reference, put when the record is freed */
            *out = rec;
            return 0;
        }
        free(rec);
        if (err != DP_SEGMENT_FULL && err != -EFBIG)
            return err;
        /* the class's segment is full, or cannot grow (RLIMIT_FSIZE: a segment starts with
         * DP_TAGS_BYTES of tags): this page gets a file of its own */
    }
    bool mapped = method == DP_WRITE_MMAP && count == 1;
    /* a shared writable mapping needs the fd open for reading too */
    int fd = open_new_page(c, nbytes, mapped ? O_RDWR : O_WRONLY, &rec);
    if (fd < 0)
        return fd;
    int err;
    if (mapped) {
        err = write_mapped(c, fd, parts[0].iov_base, nbytes);
    } else { /* dp_pwritev_all consumes its iovecs: a copy, on the stack when it is short */
        struct iovec few[8], *iov = count <= 8 ? few : malloc(count * sizeof *iov);
        err = iov ? 0 : -ENOMEM;
        if (iov) {
            memcpy(iov, parts, count * sizeof *iov);
            err = writev_synced(c, fd, iov, count);
            if (iov != few)
                free(iov);
        }
    }
    if (!err)
        err = link_page(c, rec, fd);
    /* close() can report a deferred write error (NFS and friends): it counts. */
    if (close(fd) != 0 && !err && errno != EINTR)
        err = -errno;
    if (err) {
        discard_page(c, rec);
        return err;
    }
    *out = rec;
    return 0;
}

static int sync_folder(dp_cache *c)
{
    if (c->sync != DP_SYNC_FULL)
        return 0;
    return fsync(c->dirfd) == 0 ? 0 : -errno;
}

static int enter_write(dp_cache *c)
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

int64_t dp_write(dp_hold *cache, const void *data, size_t nbytes, int method, dp_hold *page)
{
    size_t failed_at;
    uint64_t id;
    int err = dp_write_many(cache, &data, &nbytes, 1, method, &page, &id, &failed_at);
    return err ? err : (int64_t)id;
}

/* The sum of sizes, or -EOVERFLOW: a sum that wrapped would charge a few bytes for a write
 * that fills the disk. (SSIZE_MAX: a file offset must hold it.) */
static int sum_sizes(const size_t *sizes, size_t count, size_t *total)
{
    *total = 0;
    for (size_t i = 0; i < count; i++) {
        if (sizes[i] > (size_t)SSIZE_MAX - *total)
            return -EOVERFLOW;
        *total += sizes[i];
    }
    return 0;
}

/* `count` pages, all or nothing; page i is made of the parts iov[first .. first + parts[i])
 * that follow page i - 1's (parts NULL: one part each). The records stay here until every
 * page is written and published: a hold is reachable (gc.get_objects() finds its Page), so
 * it gets only a finished page. */
static int write_pages(dp_cache *c, const struct iovec *iov, const size_t *parts, size_t count,
                       int method, dp_hold *const *holds, uint64_t *ids, size_t *failed_at)
{
    *failed_at = count; /* a failure before any buffer is nobody's fault */
    size_t total = 0, nparts = 0;
    for (size_t i = 0; i < count; i++)
        nparts += parts ? parts[i] : 1;
    for (size_t i = 0; i < nparts; i++) { /* a sum that wrapped would charge a few bytes */
        if (iov[i].iov_len > (size_t)SSIZE_MAX - total)
            return -EOVERFLOW;
        total += iov[i].iov_len;
    }
    /* What the pages take on disk: each one's slot, or its file's blocks. A page charged
     * for a slot keeps that charge if its segment is full and it gets a file after all (a
     * file's blocks are never more than the slot). */
    uint64_t charge = 0;
    for (size_t i = 0, k = 0; i < count; i++) {
        size_t n = parts ? parts[i] : 1, nbytes = 0;
        for (size_t j = 0; j < n; j++)
            nbytes += iov[k++].iov_len;
        uint64_t one = dp_disk_bytes(c, nbytes, true);
        if (one > UINT64_MAX - charge)
            return -EOVERFLOW;
        charge += one;
    }
    dp_page **recs = malloc((count ? count : 1) * sizeof *recs);
    if (!recs)
        return -ENOMEM;
    int err;
    if ((err = enter_write(c))) {
        free(recs);
        return err;
    }
    if ((err = dp_charge(c, charge))) {
        pthread_rwlock_unlock(&c->closing);
        free(recs);
        return err;
    }
    size_t made = 0;
    for (const struct iovec *page = iov; made < count; made++) {
        size_t n = parts ? parts[made] : 1, nbytes = 0;
        for (size_t k = 0; k < n; k++)
            nbytes += page[k].iov_len;
        if ((err = create_page(c, page, n, nbytes, method, &recs[made])))
            break;
        recs[made]->charge = dp_disk_bytes(c, nbytes, true); /* as charged above */
        page += n;
    }
    *failed_at = made;
    bool files = false;
    for (size_t i = 0; i < made; i++)
        files |= recs[i]->cls < 0;
    if (!err && (err = dp_sync_slots(c, recs, made)))
        *failed_at = count;
    if (!err && files && (err = sync_folder(c)))
        *failed_at = count;
    if (err) {
        while (made)
            discard_page(c, recs[--made]);
        dp_uncharge(c, charge);
    } else {
        for (size_t i = 0; i < count; i++) {
            publish(c, recs[i]);
            ids[i] = recs[i]->id;
            holds[i]->ptr = recs[i];
        }
    }
    pthread_rwlock_unlock(&c->closing);
    free(recs);
    return err;
}

static int write_many(dp_cache *c, const void *const *data, const size_t *nbytes, size_t count,
                      int method, dp_hold *const *holds, uint64_t *ids, size_t *failed_at)
{
    struct iovec one, *iov = count == 1 ? &one : malloc((count ? count : 1) * sizeof *iov);
    if (!iov) {
        *failed_at = count;
        return -ENOMEM;
    }
    for (size_t i = 0; i < count; i++)
        iov[i] = (struct iovec){.iov_base = (void *)data[i], .iov_len = nbytes[i]};
    int err = write_pages(c, iov, NULL, count, method, holds, ids, failed_at);
    if (iov != &one)
        free(iov);
    return err;
}

int dp_write_many(dp_hold *cache, const void *const *data, const size_t *nbytes, size_t count,
                  int method, dp_hold *const *pages, uint64_t *ids, size_t *failed_at)
{
    dp_cache *c = dp_hold_enter(cache, dp_cache_let_go);
    if (!c) {
        *failed_at = count;
        return -DP_ECLOSED;
    }
    int err = write_many(c, data, nbytes, count, method, pages, ids, failed_at);
    dp_hold_leave(cache, dp_cache_let_go);
    return err;
}

/* The start of a single-page write: enter (not closed, not a fork), charge the budget and
 * make the nameless file. Returns the fd, with the closing lock held shared until
 * end_page; or -errno with nothing held: no lock, no charge, no file. */
static int begin_page(dp_cache *c, size_t nbytes, int access, dp_page **rec)
{
    int err = enter_write(c);
    if (err)
        return err;
    uint64_t charge = dp_disk_bytes(c, nbytes, false); /* the record's (new_record) */
    if (!(err = dp_charge(c, charge))) {
        int fd = open_new_page(c, nbytes, access, rec);
        if (fd >= 0)
            return fd;
        err = fd;
        dp_uncharge(c, charge);
    }
    pthread_rwlock_unlock(&c->closing);
    return err;
}

/* The end of it: publish the page, or (err) take back its file and its charge. */
static void end_page(dp_cache *c, dp_page *rec, int err)
{
    if (err) {
        dp_uncharge(c, rec->charge);
        discard_page(c, rec);
    } else {
        publish(c, rec);
    }
    pthread_rwlock_unlock(&c->closing);
}

static int write_parts(dp_cache *c, const void *const *parts, const size_t *sizes,
                       size_t count, bool pack, dp_hold *page, uint64_t *id)
{
    size_t total;
    int err = sum_sizes(sizes, count, &total);
    if (err)
        return err;
    struct iovec *iov = malloc((count ? count : 1) * sizeof *iov);
    if (!iov)
        return -ENOMEM;
    for (size_t i = 0; i < count; i++)
        iov[i] = (struct iovec){.iov_base = (void *)parts[i], .iov_len = sizes[i]};
    if (pack) { /* a slot if it is small enough, as dp_write */
        size_t failed_at;
        err = write_pages(c, iov, &count, 1, DP_WRITE_PWRITE, &page, id, &failed_at);
        free(iov);
        return err;
    }

    dp_page *rec;
    int fd = begin_page(c, total, O_WRONLY, &rec);
    err = fd < 0 ? fd : 0;
    if (fd >= 0) {
        /* Reserve the blocks first, as numpy's tofile does: on ext4 here a 64 MiB write
         * took 0.97x np.save's time with it and 1.38x without. Without fallocate, write. */
        err = reserve(fd, total);
        if (err == -EOPNOTSUPP)
            err = 0;
        if (!err)
            err = writev_synced(c, fd, iov, count);
        if (!err)
            err = link_page(c, rec, fd);
        /* close() can report a deferred write error (NFS and friends): it counts. */
        if (close(fd) != 0 && !err && errno != EINTR)
            err = -errno;
        if (!err)
            err = sync_folder(c);
        *id = rec->id;
        end_page(c, rec, err);
        if (!err)
            page->ptr = rec; /* published first: a hold gets only a finished page */
    }
    free(iov);
    return err;
}

int dp_write_parts(dp_hold *cache, const void *const *parts, const size_t *sizes, size_t count,
                   int pack, dp_hold *page, uint64_t *id)
{
    dp_cache *c = dp_hold_enter(cache, dp_cache_let_go);
    if (!c)
        return -DP_ECLOSED;
    int err = write_parts(c, parts, sizes, count, pack != 0, page, id);
    dp_hold_leave(cache, dp_cache_let_go);
    return err;
}

static int pread_exactly(int fd, void *buf, size_t nbytes, uint64_t offset)
{
    for (size_t done = 0; done < nbytes;) {
        ssize_t n = pread(fd, (char *)buf + done, nbytes - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -DP_ESIZE; /* shorter than the page */
        done += (size_t)n;
    }
    return 0;
}

/* Copy nbytes of src, from offset `from`, to fd from offset 0: copy_file_range (the kernel
 * copies, or shares blocks where the file system can), else read and write through a
 * buffer. */
static int copy_file(int src, uint64_t from, int fd, size_t nbytes)
{
    off_t in = (off_t)from, done = 0; /* copy_file_range advances both */
    while ((size_t)done < nbytes) {
        ssize_t n = copy_file_range(src, &in, fd, &done, nbytes - (size_t)done, 0);
        if (n > 0)
            continue;
        if (n == 0)
            return -DP_ESIZE; /* the source is shorter than it said */
        if (errno == EINTR)
            continue;
        if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
            return -errno;
        break; /* not between these two files: by hand, from where it stopped */
    }
    enum { CHUNK = 1 << 20 };
    char *buf = (size_t)done < nbytes ? malloc(CHUNK) : NULL;
    if ((size_t)done < nbytes && !buf)
        return -ENOMEM;
    int err = 0;
    while (!err && (size_t)done < nbytes) {
        size_t want = nbytes - (size_t)done < CHUNK ? nbytes - (size_t)done : CHUNK;
        struct iovec iov = {buf, want};
        if (!(err = pread_exactly(src, buf, want, from + (uint64_t)done)) &&
            !(err = dp_pwritev_all(fd, &iov, 1, done)))
            done += (off_t)want;
    }
    free(buf);
    return err;
}

/* Adopt: a hard link to src under a new page's name, or (another file system, or src has no
 * name any more) a copy of its bytes into a new file. The bytes are the same either way:
 * nobody writes into a page's file once it has its name. Then `handed`, if not NULL, is
 * unlinked: here, so that no Python code runs between the page becoming ours and the
 * handed name going. */
static int adopt(dp_cache *c, int src, size_t nbytes, const char *handed, dp_hold *page,
                 uint64_t *id)
{
    struct stat st;
    if (fstat(src, &st) != 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != nbytes)
        return -DP_ESIZE;
    int err = enter_write(c);
    if (err)
        return err;
    uint64_t charge = dp_disk_bytes(c, nbytes, false); /* the record's (new_record) */
    if ((err = dp_charge(c, charge))) {
        pthread_rwlock_unlock(&c->closing);
        return err;
    }
    /* the source's data on stable storage first, as a write of ours would put it */
    if (c->sync != DP_SYNC_NONE && fdatasync(src) != 0 && errno != EINVAL) {
        err = -errno;
        dp_uncharge(c, charge);
        pthread_rwlock_unlock(&c->closing);
        return err;
    }
    int linked = 0;
    dp_page *rec = new_record(c, nbytes);
    if (!rec) {
        err = -ENOMEM;
    } else {
        dp_cache_get(c); /* the record's reference, put when the record is freed */
        linked = link_page(c, rec, src) == 0;
        if (!linked) {
            free(rec);
            dp_cache_put(c);
            int fd = open_new_page(c, nbytes, O_WRONLY, &rec);
            err = fd < 0 ? fd : copy_file(src, 0, fd, nbytes);
            if (fd >= 0) {
                if (!err && c->sync != DP_SYNC_NONE && fdatasync(fd) != 0)
                    err = -errno;
                if (!err)
                    err = link_page(c, rec, fd);
                if (close(fd) != 0 && !err && errno != EINTR)
                    err = -errno;
                if (err)
                    discard_page(c, rec);
            }
        }
        if (!err && (err = sync_folder(c)))
            discard_page(c, rec);
    }
    if (err) {
        dp_uncharge(c, charge);
    } else {
        if (handed)
            unlink(handed); /* ENOENT: its cache closed meanwhile; the bytes are ours anyway */
        publish(c, rec);
        *id = rec->id;
        page->ptr = rec; /* published first: a hold gets only a finished page */
    }
    pthread_rwlock_unlock(&c->closing);
    return err ? err : linked;
}

int dp_adopt(dp_hold *cache, int src, size_t nbytes, const char *handed, dp_hold *page,
             uint64_t *id)
{
    dp_cache *c = dp_hold_enter(cache, dp_cache_let_go);
    if (!c)
        return -DP_ECLOSED;
    int rc = adopt(c, src, nbytes, handed, page, id);
    dp_hold_leave(cache, dp_cache_let_go);
    return rc;
}

static int allocate(dp_cache *c, size_t nbytes, dp_hold *builder, uint64_t *id)
{
    if (nbytes > (size_t)SSIZE_MAX)
        return -EOVERFLOW;
    dp_page *rec;
    int fd = begin_page(c, nbytes, O_RDWR, &rec);
    if (fd < 0)
        return fd;
    int err = reserve(fd, nbytes);
    if (err == -EOPNOTSUPP) /* no fallocate here: a sparse file, as good as it gets */
        err = ftruncate(fd, (off_t)nbytes) == 0 ? 0 : -errno;
    if (err)
        close(fd);
    else
        rec->fd = fd; /* the record owns it now: closed by dp_seal or when it is dropped */
    *id = rec->id;
    end_page(c, rec, err);
    if (!err)
        builder->ptr = rec; /* published first: a hold gets only a finished page */
    return err ? err : fd;
}

int dp_allocate(dp_hold *cache, size_t nbytes, dp_hold *builder, uint64_t *id)
{
    dp_cache *c = dp_hold_enter(cache, dp_cache_let_go);
    if (!c)
        return -DP_ECLOSED;
    int fd = allocate(c, nbytes, builder, id);
    dp_hold_leave(cache, dp_cache_let_go);
    return fd;
}

static int seal(dp_cache *c, dp_page *p)
{
    int err = enter_write(c); /* not after close has emptied the folder, not in a fork */
    if (err)
        return err;
    bool part = p->part;
    if (!(err = link_page(c, p, p->fd)) && (err = sync_folder(c))) {
        /* back to nameless (the fd keeps the bytes), so that seal() can be tried again */
        char name[DP_NAME_MAX];
        dp_page_name(p->id, name);
        if (part) {
            char part_name[DP_NAME_MAX];
            dp_part_name(p->id, part_name);
            if (renameat(c->dirfd, name, c->dirfd, part_name) == 0)
                p->part = true; /* else it keeps the page's name, and goes by that name */
        } else {
            unlinkat(c->dirfd, name, 0);
        }
    }
    pthread_rwlock_unlock(&c->closing);
    return err;
}

int dp_seal(dp_hold *builder, dp_hold *page)
{
    dp_page *p = dp_hold_enter(builder, dp_page_let_go);
    if (!p)
        return -DP_ERELEASED;
    int err = p->fd < 0 ? -DP_ERELEASED : seal(p->cache, p);
    if (!err) {
        close(p->fd); /* named: the mapping (the caller's) and the name keep the bytes */
        p->fd = -1;
        page->ptr = p;           /* the page's hold takes the record over */
        dp_hold_empty(builder); /* and the builder's has nothing left to let go of */
    }
    dp_hold_leave(builder, dp_page_let_go);
    return err;
}

/* Open name (relative to dirfd) read-only, never following a symlink, and stat it: the fd,
 * or -errno with nothing open. */
static int open_stat(int dirfd, const char *name, struct stat *st)
{
    int fd;
    do
        fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    if (fstat(fd, st) != 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

static int open_page(dp_cache *c, dp_page *p)
{
    char name[DP_NAME_MAX];
    dp_page_name(p->id, name);
    struct stat st;
    int fd = open_stat(c->dirfd, name, &st);
    if (fd < 0)
        return fd;
    /* A mapping past the end of a file faults with SIGBUS: refuse a file of the wrong size. */
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != p->nbytes) {
        close(fd);
        return -DP_ESIZE;
    }
    return fd;
}

int dp_borrow_open(const char *path, uint64_t dev, uint64_t ino, int64_t mtime_ns, int64_t size,
                   int *fd_box)
{
    struct stat st;
    int fd = open_stat(AT_FDCWD, path, &st);
    if (fd < 0)
        return fd;
    int64_t mtime = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    if ((uint64_t)st.st_dev != dev || (uint64_t)st.st_ino != ino || !S_ISREG(st.st_mode) ||
        (mtime_ns >= 0 && mtime != mtime_ns) || (size >= 0 && st.st_size != size)) {
        close(fd);
        return -ENOENT; /* another file has the name now */
    }
    *fd_box = fd;
    return 0;
}

int dp_open_at(int dirfd, const char *path, int directory, int *fd_box)
{
    int fd, flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | (directory ? O_DIRECTORY : 0);
    do
        fd = openat(dirfd, path, flags);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    *fd_box = fd;
    return 0;
}

int dp_borrow_view(int fd, const char *path)
{
    /* An OFD lock belongs to the open file description, which every mapping of it keeps:
     * it lives exactly as long as the last view made from fd (in forked children too). */
    struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    int err;
    do
        err = fcntl(fd, F_OFD_SETLK, &lock) == 0 ? 0 : -errno;
    while (err == -EINTR);
    if (err)
        return err;
    /* The owner unlinks a page's name before it looks for locks: the name still being the
     * file, now that the lock is held, means the owner will see it when it removes it. */
    struct stat held, named;
    if (fstat(fd, &held) != 0)
        return -errno;
    if (fstatat(AT_FDCWD, path, &named, AT_SYMLINK_NOFOLLOW) != 0)
        return errno == ENOENT ? -ENOENT : -errno;
    if (held.st_dev != named.st_dev || held.st_ino != named.st_ino)
        return -ENOENT;
    return 0;
}

void dp_page_share(dp_hold *h, uint64_t dev, uint64_t ino)
{
    dp_page *p = dp_hold_enter(h, dp_page_let_go);
    if (!p)
        return;
    if (!atomic_load(&p->shared)) { /* set once: a drain may read them from then on */
        p->dev = dev;
        p->ino = ino;
    }
    atomic_store_explicit(&p->shared, true, memory_order_release);
    dp_hold_leave(h, dp_page_let_go);
}

void dp_fd_box_close(int *fd_box)
{
    if (*fd_box >= 0)
        close(*fd_box);
    *fd_box = -1;
}

/* Take a pin if the record's bytes are still there (pins above 0). */
static bool pin_take(dp_page *p)
{
    unsigned n = atomic_load(&p->pins);
    do
        if (n == 0)
            return false;
    while (!atomic_compare_exchange_weak(&p->pins, &n, n + 1));
    return true;
}

static void pin_let_go(void *ptr)
{
    dp_pin *pin = ptr;
    dp_unregister_view(pin); /* its mapping is gone, or going with its Python object */
    if (pin->fd >= 0)
        close(pin->fd);
    dp_unpin(pin->rec, false);
    dp_record_put(pin->rec);
    free(pin);
}

/* The fd a pin reads by: the page's file, or a dup of its segment's fd (the segment's own
 * closes at close(); the pin's stays valid as long as the pin). */
static int pinned_fd(dp_cache *c, dp_page *p, uint64_t *offset)
{
    if (p->cls < 0) {
        *offset = 0;
        return open_page(c, p);
    }
    struct dp_segment *s = &c->segs[p->cls];
    *offset = DP_TAGS_BYTES + (uint64_t)p->slot * s->slot_size;
    int fd = fcntl(s->fd, F_DUPFD_CLOEXEC, 0);
    return fd >= 0 ? fd : -errno;
}

static int page_pin(dp_page *p, dp_hold *hold)
{
    dp_cache *c = p->cache;
    dp_pin *pin = calloc(1, sizeof *pin); /* not registered, no view mapped yet */
    if (!pin)
        return -ENOMEM;
    int fd = -DP_ERELEASED;
    /* Under the closing lock, shared: close() closes the folder's and the segments' fds
     * only after every reader that saw them open has left. A forked child takes no lock (a
     * parent thread may have held it at fork time); it never closes its copies early. */
    bool forked = dp_pid() != c->owner;
    if (!forked)
        pthread_rwlock_rdlock(&c->closing);
    if (!atomic_load(&p->released) && !atomic_load(&c->closed) && pin_take(p)) {
        fd = pinned_fd(c, p, &pin->offset);
        if (fd < 0)
            dp_unpin(p, false);
    }
    if (!forked)
        pthread_rwlock_unlock(&c->closing);
    if (fd < 0) {
        free(pin);
        /* released while we opened: the caller says released, not lost */
        return atomic_load(&p->released) ? -DP_ERELEASED : fd;
    }
    atomic_fetch_add(&p->refs, 1); /* the pin's reference to the record */
    pin->rec = p;
    pin->fd = fd;
    hold->ptr = pin;
    return fd;
}

int dp_page_pin(dp_hold *page, dp_hold *pin, uint64_t *offset)
{
    dp_page *p = dp_hold_enter(page, dp_page_let_go);
    if (!p)
        return -DP_ERELEASED;
    int fd = page_pin(p, pin);
    if (fd >= 0)
        *offset = ((dp_pin *)pin->ptr)->offset;
    dp_hold_leave(page, dp_page_let_go);
    return fd;
}

/* Hand over: the page's bytes get a file of their own named `name`, outside the page's
 * lifetime (a hard link to its file; a packed page's slot copied into a new file). */
static int hand_over(dp_page *p, const char *name, int64_t *identity)
{
    dp_cache *c = p->cache;
    int err = enter_write(c); /* not after close, not in a forked child: a name in our folder */
    if (err)
        return err;
    err = -DP_ERELEASED;
    if (!atomic_load(&p->released) && pin_take(p)) {
        uint64_t offset;
        int fd = pinned_fd(c, p, &offset), file = fd;
        bool named = false;
        err = fd < 0 ? fd : 0;
        if (fd >= 0 && p->cls >= 0) { /* a slot, pinned: nobody reuses it while we copy */
            file = open_nameless(c, O_RDWR, name, &named);
            err = file < 0 ? -errno : copy_file(fd, offset, file, p->nbytes);
        }
        if (!err && c->sync != DP_SYNC_NONE && fdatasync(file) != 0)
            err = -errno;
        if (!err && !named)
            err = link_fd(c, file, name);
        struct stat st;
        if (!err && fstat(file, &st) != 0)
            err = -errno;
        if (!err && (err = sync_folder(c)))
            unlinkat(c->dirfd, name, 0);
        if (!err && (err = dp_remember_handed(c, name)))
            unlinkat(c->dirfd, name, 0);
        if (!err) {
            identity[0] = (int64_t)st.st_dev;
            identity[1] = (int64_t)st.st_ino;
            identity[2] = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
        } else if (named) {
            unlinkat(c->dirfd, name, 0);
        }
        if (file >= 0 && file != fd)
            close(file);
        if (fd >= 0)
            close(fd);
        dp_unpin(p, false);
    }
    pthread_rwlock_unlock(&c->closing);
    return err;
}

int dp_hand_over(dp_hold *page, const char *name, int64_t *identity)
{
    dp_page *p = dp_hold_enter(page, dp_page_let_go);
    if (!p)
        return -DP_ERELEASED;
    int err = hand_over(p, name, identity);
    dp_hold_leave(page, dp_page_let_go);
    return err;
}

/* Read a slot's bytes; `check`: in a forked child, whose pins are out of the parent's
 * sight, the parent may have removed the page and reused the slot: its tag, read before
 * and after, says whether what was read is the page's (-ENOENT if not). */
static int read_slot(const dp_page *p, int fd, void *buf, size_t nbytes, uint64_t offset,
                     bool check)
{
    if (check && !dp_slot_is(p))
        return -ENOENT;
    int err = pread_exactly(fd, buf, nbytes, offset);
    if (!err && check && !dp_slot_is(p))
        err = -ENOENT;
    return err;
}

static int page_read(dp_page *p, void *buf, size_t nbytes)
{
    dp_cache *c = p->cache;
    if (nbytes != p->nbytes)
        return -EINVAL;
    int err = -DP_ERELEASED;
    bool forked = dp_pid() != c->owner;
    if (!forked) /* as page_pin; held across the read, so the segment's fd stays open */
        pthread_rwlock_rdlock(&c->closing);
    if (!atomic_load(&p->released) && !atomic_load(&c->closed) && pin_take(p)) {
        if (p->cls >= 0) {
            struct dp_segment *s = &c->segs[p->cls];
            err = read_slot(p, s->fd, buf, nbytes,
                            DP_TAGS_BYTES + (uint64_t)p->slot * s->slot_size, forked);
        } else {
            int fd = open_page(c, p);
            err = fd < 0 ? fd : pread_exactly(fd, buf, nbytes, 0);
            if (fd >= 0)
                close(fd);
        }
        dp_unpin(p, false);
    }
    if (!forked)
        pthread_rwlock_unlock(&c->closing);
    return err < 0 && atomic_load(&p->released) ? -DP_ERELEASED : err;
}

int dp_page_read(dp_hold *page, void *buf, size_t nbytes)
{
    dp_page *p = dp_hold_enter(page, dp_page_let_go);
    if (!p)
        return -DP_ERELEASED;
    int err = page_read(p, buf, nbytes);
    dp_hold_leave(page, dp_page_let_go);
    return err;
}

static int map_pinned(int fd, void *addr, size_t nbytes, uint64_t offset)
{
    if (mmap(addr, nbytes, PROT_READ, MAP_SHARED | MAP_FIXED, fd, (off_t)offset) != MAP_FAILED)
        return 0;
    int err = -errno;
    /* a failed MAP_FIXED may leave a hole: fill it, so the owner's munmap never hits a
     * mapping that some other code placed there */
    mmap(addr, nbytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    return err;
}

/* A forked child's view of a slot: a checked copy in private memory at addr, never a
 * shared mapping (the parent may reuse the slot: the child's pin is out of its sight). */
static int copy_slot(dp_pin *pin, void *addr, size_t nbytes)
{
    void *at = mmap(addr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                    -1, 0);
    if (at == MAP_FAILED)
        return -errno;
    int err = read_slot(pin->rec, pin->fd, addr, nbytes, pin->offset, true);
    mprotect(addr, nbytes, PROT_READ);
    return err;
}

int dp_pin_map(dp_hold *hold, void *addr, size_t nbytes)
{
    dp_pin *pin = dp_hold_enter(hold, pin_let_go);
    if (!pin)
        return -DP_ERELEASED;
    int err = -DP_ERELEASED;
    if (pin->fd >= 0) {
        dp_page *p = pin->rec;
        bool packed = p->cls >= 0, forked = dp_pid() != p->cache->owner;
        struct stat st;
        if (packed && (fstat(pin->fd, &st) != 0 || (uint64_t)st.st_size < pin->offset + nbytes))
            err = -DP_ESIZE; /* a segment cut short under us: a mapping would fault (SIGBUS) */
        else
            err = packed && forked ? copy_slot(pin, addr, nbytes)
                                   : map_pinned(pin->fd, addr, nbytes, pin->offset);
        if (!err && packed && !forked) {
            pin->addr = addr;
            pin->len = (nbytes + 4095) / 4096 * 4096;
            dp_register_view(pin); /* so that a fork can protect a child's copy of it */
        }
        close(pin->fd); /* the mapping holds the bytes now */
        pin->fd = -1;
    }
    dp_hold_leave(hold, pin_let_go);
    return err;
}

void dp_pin_forget(dp_hold *hold)
{
    dp_pin *pin = dp_hold_enter(hold, pin_let_go);
    if (pin) {
        dp_unregister_view(pin);
        dp_hold_leave(hold, pin_let_go);
    }
}

void dp_pin_remember(dp_hold *hold)
{
    dp_pin *pin = dp_hold_enter(hold, pin_let_go);
    if (pin) {
        if (pin->addr && !pin->registered)
            dp_register_view(pin);
        dp_hold_leave(hold, pin_let_go);
    }
}

void dp_pin_drop(dp_hold *hold)
{
    if (dp_hold_drop(hold))
        pin_let_go(hold->ptr);
}

int dp_page_slot(dp_hold *page, uint64_t *slot_size, uint64_t *slot)
{
    dp_page *p = dp_hold_enter(page, dp_page_let_go);
    if (!p)
        return -DP_ERELEASED;
    int packed = p->cls >= 0;
    if (packed) {
        *slot_size = p->cache->segs[p->cls].slot_size;
        *slot = p->slot;
    }
    dp_hold_leave(page, dp_page_let_go);
    return packed;
}

int dp_map_fixed(int fd, void *addr, size_t nbytes)
{
    return map_pinned(fd, addr, nbytes, 0);
}
