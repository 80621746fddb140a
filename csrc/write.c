/* Putting pages on disk: pwrite or a shared mapping, with the fsyncs the sync mode asks for;
 * builders (allocate, seal), adopt and hand over.
 * A page is created (newfile.c) and filled first, then published (counted live, handed to
 * Python); anything that fails before publishing unlinks the file, so a failure leaves
 * nothing. Nothing below calls into this file: it sits under cache.c's open and close. */
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
        if (!(rec = dp_new_record(c, nbytes)))
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
    int fd = dp_open_new_page(c, nbytes, mapped ? O_RDWR : O_WRONLY, &rec);
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
        err = dp_link_page(c, rec, fd);
    /* close() can report a deferred write error (NFS and friends): it counts. */
    if (close(fd) != 0 && !err && errno != EINTR)
        err = -errno;
    if (err) {
        dp_discard_page(c, rec);
        return err;
    }
    *out = rec;
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
    dp_page *one, **recs = count <= 1 ? &one : malloc(count * sizeof *recs);
    if (!recs)
        return -ENOMEM;
    int err;
    if ((err = dp_enter_write(c)))
        goto out;
    if ((err = dp_charge(c, charge))) {
        pthread_rwlock_unlock(&c->closing);
        goto out;
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
    if (!err && files && (err = dp_sync_folder(c)))
        *failed_at = count;
    if (err) {
        while (made)
            dp_discard_page(c, recs[--made]);
        dp_uncharge(c, charge);
    } else {
        for (size_t i = 0; i < count; i++) {
            dp_publish(c, recs[i]);
            ids[i] = recs[i]->id;
            holds[i]->ptr = recs[i];
        }
    }
    pthread_rwlock_unlock(&c->closing);
out:
    if (recs != &one) /* one page's record pointer lives on the stack */
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
    int err = dp_enter_write(c);
    if (err)
        return err;
    uint64_t charge = dp_disk_bytes(c, nbytes, false); /* the record's (new_record) */
    if (!(err = dp_charge(c, charge))) {
        int fd = dp_open_new_page(c, nbytes, access, rec);
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
        dp_discard_page(c, rec);
    } else {
        dp_publish(c, rec);
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
            err = dp_link_page(c, rec, fd);
        /* close() can report a deferred write error (NFS and friends): it counts. */
        if (close(fd) != 0 && !err && errno != EINTR)
            err = -errno;
        if (!err)
            err = dp_sync_folder(c);
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
    int err = dp_enter_write(c);
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
    dp_page *rec = dp_new_record(c, nbytes);
    if (!rec) {
        err = -ENOMEM;
    } else {
        dp_cache_get(c); /* the record's reference, put when the record is freed */
        linked = dp_link_page(c, rec, src) == 0;
        if (linked) /* the file another cache had: views of it may be out there */
            dp_record_share(rec, (uint64_t)st.st_dev, (uint64_t)st.st_ino);
        else {
            free(rec);
            dp_cache_put(c);
            int fd = dp_open_new_page(c, nbytes, O_WRONLY, &rec);
            err = fd < 0 ? fd : dp_copy_file(src, 0, fd, nbytes);
            if (fd >= 0) {
                if (!err && c->sync != DP_SYNC_NONE && fdatasync(fd) != 0)
                    err = -errno;
                if (!err)
                    err = dp_link_page(c, rec, fd);
                if (close(fd) != 0 && !err && errno != EINTR)
                    err = -errno;
                if (err)
                    dp_discard_page(c, rec);
            }
        }
        if (!err && (err = dp_sync_folder(c)))
            dp_discard_page(c, rec);
    }
    if (err) {
        dp_uncharge(c, charge);
    } else {
        if (handed)
            unlink(handed); /* ENOENT: its cache closed meanwhile; the bytes are ours anyway */
        dp_publish(c, rec);
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
    int err = dp_enter_write(c); /* not after close has emptied the folder, not in a fork */
    if (err)
        return err;
    bool part = p->part;
    if (!(err = dp_link_page(c, p, p->fd)) && (err = dp_sync_folder(c))) {
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

/* A name hand over made, for stats (0 or -ENOMEM): cache.c counts the ones still there. */
static int remember_handed(dp_cache *c, const char *name)
{
    char *copy = strdup(name);
    if (!copy)
        return -ENOMEM;
    pthread_mutex_lock(&c->lock);
    if (c->nhanded == c->handed_cap) {
        size_t cap = c->handed_cap ? 2 * c->handed_cap : 16;
        char **more = realloc(c->handed, cap * sizeof *more);
        if (!more) {
            pthread_mutex_unlock(&c->lock);
            free(copy);
            return -ENOMEM;
        }
        c->handed = more;
        c->handed_cap = cap;
    }
    c->handed[c->nhanded++] = copy;
    pthread_mutex_unlock(&c->lock);
    return 0;
}

/* Hand over: the page's bytes get a file of their own named `name`, outside the page's
 * lifetime (a hard link to its file; a packed page's slot copied into a new file). */
static int hand_over(dp_page *p, const char *name, int64_t *identity)
{
    dp_cache *c = p->cache;
    int err = dp_enter_write(c); /* not after close, not in a forked child: a name in our folder */
    if (err)
        return err;
    err = -DP_ERELEASED;
    if (!atomic_load(&p->released) && dp_pin_take(p)) {
        uint64_t offset;
        int fd = dp_pinned_fd(c, p, &offset), file = fd;
        bool named = false;
        err = fd < 0 ? fd : 0;
        if (fd >= 0 && p->cls >= 0) { /* a slot, pinned: nobody reuses it while we copy */
            file = dp_open_nameless(c, O_RDWR, name, &named);
            err = file < 0 ? -errno : dp_copy_file(fd, offset, file, p->nbytes);
        }
        if (!err && c->sync != DP_SYNC_NONE && fdatasync(file) != 0)
            err = -errno;
        if (!err && !named)
            err = dp_link_fd(c, file, name);
        struct stat st;
        if (!err && fstat(file, &st) != 0)
            err = -errno;
        if (!err && (err = dp_sync_folder(c)))
            unlinkat(c->dirfd, name, 0);
        if (!err && (err = remember_handed(c, name)))
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
