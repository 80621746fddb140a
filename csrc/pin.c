/* Reading a page: pins that hold its bytes for a reader, the reads and views through them,
 * and the borrowers' side of a pickled page (its file checked, opened, viewed).
 *
 * A pin keeps a record's bytes on disk (and charged) until it is dropped, even after the
 * page is released: a reused slot never shows another page's bytes to a reader that
 * could still look. Below the writes (write.c's hand over takes a pin); it calls the
 * records, holds, segments and the reaper's release path, never a write. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "internal.h"

#define OVERLAYFS_MAGIC 0x794c7630 /* linux/magic.h's OVERLAYFS_SUPER_MAGIC */

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

/* An OFD read lock on the file open at fd, for its views: 0, 1 where the lock lives only
 * as long as fd (overlayfs maps the file under it, so a mapping does not keep the overlay's
 * file open), or -errno. */
static int lock_for_views(int fd)
{
    struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    int err;
    do
        err = fcntl(fd, F_OFD_SETLK, &lock) == 0 ? 0 : -errno;
    while (err == -EINTR);
    struct statfs fs;
    if (!err && fstatfs(fd, &fs) == 0 && fs.f_type == OVERLAYFS_MAGIC)
        return 1;
    return err;
}

int dp_borrow_view(int fd, const char *path)
{
    /* An OFD lock belongs to the open file description, which every mapping of it keeps:
     * it lives exactly as long as the last view made from fd (in forked children too). */
    int err = lock_for_views(fd);
    if (err < 0)
        return err;
    int keep = err;
    /* The owner unlinks a page's name before it looks for locks: the name still being the
     * file, now that the lock is held, means the owner will see it when it removes it. */
    struct stat held, named;
    if (fstat(fd, &held) != 0)
        return -errno;
    if (fstatat(AT_FDCWD, path, &named, AT_SYMLINK_NOFOLLOW) != 0)
        return errno == ENOENT ? -ENOENT : -errno;
    if (held.st_dev != named.st_dev || held.st_ino != named.st_ino)
        return -ENOENT;
    return keep;
}

void dp_page_share(dp_hold *h, uint64_t dev, uint64_t ino)
{
    dp_page *p = dp_hold_enter(h, dp_page_let_go);
    if (!p)
        return;
    dp_record_share(p, dev, ino);
    dp_hold_leave(h, dp_page_let_go);
}

void dp_fd_box_close(int *fd_box)
{
    if (*fd_box >= 0)
        close(*fd_box);
    *fd_box = -1;
}

/* Take a pin if the record's bytes are still there (pins above 0). */
bool dp_pin_take(dp_page *p)
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
int dp_pinned_fd(dp_cache *c, dp_page *p, uint64_t *offset)
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
    if (!atomic_load(&p->released) && !atomic_load(&c->closed) && dp_pin_take(p)) {
        fd = dp_pinned_fd(c, p, &pin->offset);
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

/* Read a slot's bytes; `check`: in a forked child, whose pins are out of the parent's
 * sight, the parent may have removed the page and reused the slot: its tag, read before
 * and after, says whether what was read is the page's (-ENOENT if not). */
static int read_slot(const dp_page *p, int fd, void *buf, size_t nbytes, uint64_t offset,
                     bool check)
{
    if (check && !dp_slot_is(p))
        return -ENOENT;
    int err = dp_pread_exactly(fd, buf, nbytes, offset);
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
    if (!atomic_load(&p->released) && !atomic_load(&c->closed) && dp_pin_take(p)) {
        if (p->cls >= 0) {
            struct dp_segment *s = &c->segs[p->cls];
            err = read_slot(p, s->fd, buf, nbytes,
                            DP_TAGS_BYTES + (uint64_t)p->slot * s->slot_size, forked);
        } else {
            int fd = open_page(c, p);
            err = fd < 0 ? fd : dp_pread_exactly(fd, buf, nbytes, 0);
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
