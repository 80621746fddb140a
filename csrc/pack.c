/* Packed pages: small pages as slots in one segment file per size class.
 *
 * A file per page puts every small page through the file system's slowest paths: a create
 * (which, after many deletions, scans for a free inode), an unlink, and a TRIM for every
 * freed extent on a disk mounted `discard`. A slot is reused in place: writing a page is a
 * pwrite at its offset, freeing it is a bit in a bitmap, and neither touches the file
 * system's metadata. The segment grows in chunks (fallocate: an eighth of itself, 256 KiB to
 * 1 MiB), and the reaper gives back the blocks of freed slots in coalesced runs (trim.c)
 * once they are more than the live slots need, so the bytes on disk follow the live bytes.
 *
 * Who may look at a slot's bytes: the page, through its record, and its pins (a read under
 * way, a view: dp_page_pin). The slot goes back to the free bitmap only when the last of
 * them is done (dp_unpin), so a reused slot never shows another page's bytes to anyone who
 * could still look. Readers in other processes have no pin: they check the slot's tag
 * before and after reading (see dp_tag in diskpages.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "segment.h"


/* Slot sizes: 4 KiB steps up to 256 KiB (the default pack_max), then eight classes per
 * doubling up to 1 MiB. Up to 256 KiB a slot takes what a file of the page takes, its
 * whole 4 KiB blocks: eight classes a doubling put a dask worker's 205 KB chunks (200 KiB
 * of array and a header) in 208 KiB slots, 2% more disk than its own files. Above, a page
 * wastes less than an eighth of its size. A class in use costs a segment file (an fd and
 * 32 MiB of address space for its tags) and up to a growth chunk ahead of its slots:
 * benchmarks/slot_classes.py weighs both on several size mixes. */
#define STEPS_4K 64 /* classes 4 KiB apart: 4 KiB ... 256 KiB */

static uint32_t slot_size_of(int cls)
{
    if (cls < STEPS_4K)
        return (uint32_t)(cls + 1) * 4 * KIB;
    int k = cls - STEPS_4K;
    uint32_t base = 256 * KIB << (k / 8); /* 288 KiB ... 1 MiB: base + base / 8 steps */
    return base + (uint32_t)(k % 8 + 1) * (base / 8);
}

void dp_segment_name(uint64_t slot_size, char *buf)
{
    snprintf(buf, DP_NAME_MAX, "%llu.slots", (unsigned long long)slot_size);
}

void dp_segments_init(dp_cache *c)
{
    dp_slot_views_init(); /* the fork handlers that keep views of slots safe */
    for (int i = 0; i < DP_CLASSES; i++) {
        struct dp_segment *s = &c->segs[i];
        pthread_mutex_init(&s->lock, NULL);
        s->slot_size = slot_size_of(i);
        s->fd = -1;
    }
}

int dp_class_of(const dp_cache *c, size_t nbytes)
{
    if (c->pack_max == 0 || nbytes > c->pack_max) /* 0: no packing, empty pages included */
        return -1;
    if (nbytes <= STEPS_4K * 4 * KIB)
        return nbytes ? (int)((nbytes - 1) / (4 * KIB)) : 0;
    for (int i = STEPS_4K; i < DP_CLASSES; i++)
        if (nbytes <= slot_size_of(i))
            return i;
    return -1;
}

uint64_t dp_disk_bytes(const dp_cache *c, uint64_t nbytes, bool pack)
{
    int cls = pack && c ? dp_class_of(c, nbytes) : -1; /* c NULL: a file's */
    if (cls >= 0)
        return slot_size_of(cls);
    if (nbytes > UINT64_MAX - BLOCK)
        return UINT64_MAX; /* more than any budget holds */
    return nbytes <= BLOCK ? BLOCK : (nbytes + BLOCK - 1) / BLOCK * BLOCK;
}

/* Whether fd means the same file in the process's own fd table (the thread-group
 * leader's, /proc/self/fd) as in this thread's. True where /proc cannot tell. */
static bool in_process_table(int fd)
{
    char path[48];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    struct stat mine, process;
    if (fstat(fd, &mine) != 0)
        return false;
    if (stat(path, &process) != 0)
        return access("/proc/self/fd", F_OK) != 0; /* no /proc: nothing to compare */
    return mine.st_dev == process.st_dev && mine.st_ino == process.st_ino;
}

/* Make the segment file and its tags' mapping (the bitmaps come with its growth). Lock held. */
static int segment_create(dp_cache *c, struct dp_segment *s)
{
    char name[DP_NAME_MAX];
    dp_segment_name(s->slot_size, name);
    int fd;
    do
        fd = openat(c->dirfd, name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    if (!in_process_table(fd)) {
        /* Made by a thread with an fd table of its own (unshare(CLONE_FILES)): the number
         * means another file, or nothing, to every other thread. Not a segment, then: this
         * page gets a file, and a thread of the process's table makes the segment. */
        close(fd);
        unlinkat(c->dirfd, name, 0);
        return DP_SEGMENT_FULL;
    }
    int err = 0;
    /* The tags are sparse until the slots they describe exist (segment_grow reserves
     * their blocks, so a store into the mapping never meets ENOSPC: that would be SIGBUS) */
    if (!err && ftruncate(fd, DP_TAGS_BYTES) != 0)
        err = -errno;
    void *tags = MAP_FAILED;
    if (!err) {
        tags = mmap(NULL, DP_TAGS_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (tags == MAP_FAILED)
            err = -errno;
        else /* no readahead: a fault on one tag would fill megabytes of the sparse area */
            madvise(tags, DP_TAGS_BYTES, MADV_RANDOM);
    }
    if (!err && c->sync == DP_SYNC_FULL && fsync(c->dirfd) != 0)
        err = -errno; /* the segment's name, durable as a page's would be */
    if (err) {
        if (tags != MAP_FAILED)
            munmap(tags, DP_TAGS_BYTES);
        close(fd);
        unlinkat(c->dirfd, name, 0);
        return err;
    }
    s->tags = tags;
    __atomic_store_n(&s->fd, fd, __ATOMIC_RELEASE); /* dp_trim reads it without the lock */
    return 0;
}

/* Allocate [off, off + len) of fd, or at least make the file that long. */
static int reserve_range(int fd, uint64_t off, uint64_t len, bool zero_fill)
{
    int err;
    do
        err = fallocate(fd, 0, (off_t)off, (off_t)len) == 0 ? 0 : -errno;
    while (err == -EINTR);
    if (err != -EOPNOTSUPP && err != -ENOSYS)
        return err;
    if (!zero_fill) /* a data range: its blocks come with the pwrite */
        return ftruncate(fd, (off_t)(off + len)) == 0 ? 0 : -errno;
    static const char zeros[BLOCK];
    for (uint64_t done = 0; done < len;) { /* tags: they must have blocks before a store */
        size_t step = len - done < BLOCK ? (size_t)(len - done) : BLOCK;
        ssize_t n = pwrite(fd, zeros, step, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += (uint64_t)n;
    }
    return 0;
}

/* Bitmaps for n slots: they grow with the segment. Lock held. */
static int bitmaps_for(struct dp_segment *s, uint32_t n)
{
    size_t had = (s->nslots + WORD_BITS - 1) / WORD_BITS, want = (n + WORD_BITS - 1) / WORD_BITS;
    if (want <= had)
        return 0;
    uint64_t *maps[2] = {s->taken, s->hold_blocks};
    for (int k = 0; k < 2; k++) {
        uint64_t *more = realloc(maps[k], want * sizeof *more);
        if (!more)
            return -ENOMEM; /* what was reallocated stays, larger: harmless */
        memset(more + had, 0, (want - had) * sizeof *more);
        maps[k] = more;
        if (k == 0)
            s->taken = more;
        else
            s->hold_blocks = more;
    }
    return 0;
}

static int grow_by(struct dp_segment *s, uint32_t chunk);

/* Room for one more chunk of slots (one slot, if the disk has no room for a chunk). */
static int segment_grow(struct dp_segment *s)
{
    if (s->cutting) /* rare, and brief: this one page gets a file rather than wait */
        return DP_SEGMENT_FULL;
    int err = grow_by(s, chunk_slots(s));
    if (err == -ENOSPC && chunk_slots(s) > 1)
        err = grow_by(s, 1); /* a nearly full disk: a page that fits must still be written */
    return err;
}

/* Lock held. */
static int grow_by(struct dp_segment *s, uint32_t chunk)
{
    uint32_t n = s->nslots + chunk < DP_MAX_SLOTS ? s->nslots + chunk : DP_MAX_SLOTS;
    if (n == s->nslots)
        return DP_SEGMENT_FULL;
    int err = bitmaps_for(s, n);
    if (err)
        return err;
    uint64_t tags_want = tags_end(n), tags_had = tags_end(s->nslots);
    if (tags_want > tags_had)
        err = reserve_range(s->fd, tags_had, tags_want - tags_had, true);
    if (!err)
        err = reserve_range(s->fd, slot_offset(s, s->nslots),
                            (uint64_t)(n - s->nslots) * s->slot_size, false);
    if (err)
        return err;
    for (uint32_t i = s->nslots; i < n; i++)
        set_bit(s->hold_blocks, i); /* fallocate gave them blocks */
    s->backed += n - s->nslots;
    s->nslots = n;
    return 0;
}

/* The lowest free slot, or false. Lock held. */
static bool find_free(struct dp_segment *s, uint32_t *slot)
{
    uint32_t words = (s->nslots + WORD_BITS - 1) / WORD_BITS;
    for (uint32_t w = s->hint; w < words; w++) {
        if (s->taken[w] == ~0ull)
            continue;
        uint32_t i = w * WORD_BITS + (uint32_t)__builtin_ctzll(~s->taken[w]);
        s->hint = w;
        if (i >= s->nslots)
            return false;
        *slot = i;
        return true;
    }
    s->hint = words;
    return false;
}

static int take_slot(dp_cache *c, struct dp_segment *s, uint32_t *slot)
{
    bool drained = false;
    pthread_mutex_lock(&s->lock);
    int err = s->fd < 0 ? segment_create(c, s) : 0;
    while (!err) {
        if (find_free(s, slot)) {
            set_bit(s->taken, *slot);
            s->used++;
            if (!bit(s->hold_blocks, *slot)) { /* punched: the write gives it blocks again */
                set_bit(s->hold_blocks, *slot);
                s->backed++;
            }
            break;
        }
        if (!drained && atomic_load_explicit(&c->released_slots, memory_order_relaxed)) {
            /* freed slots wait in the queue: take them back before growing the file */
            pthread_mutex_unlock(&s->lock);
            dp_drain_slots(c);
            drained = true;
            pthread_mutex_lock(&s->lock);
            continue;
        }
        err = segment_grow(s);
    }
    pthread_mutex_unlock(&s->lock);
    return err;
}

/* Lock held. The tag goes first: a reader in another process who then finds id 0 (or
 * another page's id) knows what it read may not be the page. */
static void free_slot(struct dp_segment *s, uint32_t slot)
{
    __atomic_store_n(&s->tags[slot].id, 0, __ATOMIC_SEQ_CST);
    clear_bit(s->taken, slot);
    s->used--;
    if (slot / WORD_BITS < s->hint)
        s->hint = slot / WORD_BITS;
}

/* Lock held: keep a freed slot taken until no forked child can still see it. */
static void defer_slot(dp_cache *c, struct dp_segment *s, uint32_t slot)
{
    if (s->ndeferred == s->deferred_cap) {
        size_t cap = s->deferred_cap ? 2 * s->deferred_cap : 16;
        uint32_t *more = realloc(s->deferred, cap * sizeof *more);
        if (!more)
            return; /* the slot stays taken until close: lost room, never wrong bytes */
        s->deferred = more;
        s->deferred_cap = cap;
    }
    s->deferred[s->ndeferred++] = slot;
    atomic_fetch_add(&c->deferred, 1); /* the reaper keeps ticking until it is freed */
}

static void give_back(dp_cache *c, dp_page *p)
{
    /* A forked child never reuses a slot: the segment is its parent's. */
    if (dp_pid() != c->owner)
        return;
    struct dp_segment *s = &c->segs[p->cls];
    pthread_mutex_lock(&s->lock);
    if (s->tags) { /* not after close: the segment is gone */
        /* seq_cst, with the fork's increment (under views_lock, while our pin was alive) */
        if (__atomic_load_n(&s->tags[p->slot].viewers, __ATOMIC_SEQ_CST))
            defer_slot(c, s, p->slot); /* a child still reads it through an inherited view */
        else
            free_slot(s, p->slot);
    }
    pthread_mutex_unlock(&s->lock);
}

/* The page is removed: from now on its tag says so (borrowers and forked children read
 * PageLostError, and `ls` no longer counts it), even while a view keeps the slot. */
static void untag(dp_cache *c, dp_page *p)
{
    struct dp_segment *s = &c->segs[p->cls];
    pthread_mutex_lock(&s->lock);
    if (s->tags && dp_pid() == c->owner)
        __atomic_store_n(&s->tags[p->slot].id, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&s->lock);
}

bool dp_slot_is(const dp_page *p)
{
    struct dp_segment *s = &p->cache->segs[p->cls];
    return s->tags && __atomic_load_n(&s->tags[p->slot].id, __ATOMIC_SEQ_CST) == p->id;
}

int dp_write_slot(dp_cache *c, int cls, const struct iovec *parts, size_t count, size_t nbytes,
                  dp_page *rec)
{
    struct dp_segment *s = &c->segs[cls];
    /* Zeros up to the next 4 KiB, as one more part: a view maps whole blocks, which then
     * hold nothing of the slot's earlier pages. (dp_pwritev_all consumes its iovecs.) */
    static const char zeros[BLOCK];
    struct iovec few[8], *iov = count < 8 ? few : malloc((count + 1) * sizeof *iov);
    if (!iov)
        return -ENOMEM;
    memcpy(iov, parts, count * sizeof *iov);
    iov[count] = (struct iovec){(void *)zeros, (BLOCK - nbytes % BLOCK) % BLOCK};
    uint32_t slot = 0;
    int err = take_slot(c, s, &slot);
    if (!err) {
        rec->cls = cls;
        rec->slot = slot;
        err = dp_pwritev_all(s->fd, iov, count + 1, (off_t)slot_offset(s, slot));
        if (err) {
            rec->cls = -1;
            pthread_mutex_lock(&s->lock);
            free_slot(s, slot);
            pthread_mutex_unlock(&s->lock);
        }
    }
    if (iov != few)
        free(iov);
    if (err)
        return err;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    s->tags[slot].nbytes = nbytes;
    s->tags[slot].written_ns = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
    __atomic_store_n(&s->tags[slot].id, rec->id, __ATOMIC_RELEASE);
    return 0;
}

void dp_discard_slot(dp_cache *c, dp_page *rec)
{
    struct dp_segment *s = &c->segs[rec->cls];
    pthread_mutex_lock(&s->lock);
    free_slot(s, rec->slot);
    pthread_mutex_unlock(&s->lock);
}

int dp_sync_slots(dp_cache *c, dp_page *const *recs, size_t count)
{
    if (c->sync == DP_SYNC_NONE)
        return 0;
    bool done[DP_CLASSES] = {false};
    for (size_t i = 0; i < count; i++) {
        int cls = recs[i]->cls;
        if (cls < 0 || done[cls])
            continue;
        done[cls] = true;
        if (fdatasync(c->segs[cls].fd) != 0)
            return -errno;
    }
    return 0;
}

void dp_unpin(dp_page *p, bool removal)
{
    dp_cache *c = p->cache;
    if (removal) { /* the page is removed; until its last pin goes, its bytes are pinned */
        if (p->cls >= 0)
            untag(c, p);
        atomic_fetch_add(&c->pinned, 1);
        atomic_fetch_add(&c->pinned_bytes, p->charge);
    }
    if (atomic_fetch_sub_explicit(&p->pins, 1, memory_order_acq_rel) != 1)
        return;
    if (p->cls >= 0)
        give_back(c, p); /* before pinned drops: a deferred slot is counted by then, so the
                          * reaper, which reads pinned and then deferred, never sleeps on it */
    atomic_fetch_sub(&c->pinned, 1);
    atomic_fetch_sub(&c->pinned_bytes, p->charge);
    dp_uncharge(c, p->charge); /* room again: after the slot is free for the writer */
}

int64_t dp_drain_slots(dp_cache *c)
{
    dp_page *p = atomic_exchange(&c->released_slots, NULL);
    int64_t count = 0;
    while (p) {
        dp_page *next = p->next;
        dp_count_add(&c->counts.drained, p);
        atomic_fetch_add(&c->removed, 1);
        dp_unpin(p, true);
        dp_record_put(p);
        count++;
        p = next;
    }
    return count;
}

/* Lock held: free the deferred slots that no forked child sees any more (the trim's). */
void dp_release_deferred(dp_cache *c, struct dp_segment *s)
{
    for (size_t i = 0; s->tags && i < s->ndeferred;) {
        uint32_t slot = s->deferred[i];
        if (__atomic_load_n(&s->tags[slot].viewers, __ATOMIC_SEQ_CST) == 0) {
            free_slot(s, slot);
            s->deferred[i] = s->deferred[--s->ndeferred];
            atomic_fetch_sub(&c->deferred, 1);
        } else {
            i++;
        }
    }
}

void dp_segments_close(dp_cache *c)
{
    for (int i = 0; i < DP_CLASSES; i++) {
        struct dp_segment *s = &c->segs[i];
        pthread_mutex_lock(&s->lock);
        if (s->tags) {
            munmap(s->tags, DP_TAGS_BYTES);
            s->tags = NULL;
        }
        if (s->fd >= 0) {
            close(s->fd);
            __atomic_store_n(&s->fd, -1, __ATOMIC_RELAXED);
        }
        pthread_mutex_unlock(&s->lock);
    }
}

void dp_segments_free(dp_cache *c)
{
    bool owner = dp_pid() == c->owner;
    for (int i = 0; i < DP_CLASSES; i++) {
        struct dp_segment *s = &c->segs[i];
        if (s->tags)
            munmap(s->tags, DP_TAGS_BYTES);
        if (s->fd >= 0)
            close(s->fd);
        free(s->taken);
        free(s->hold_blocks);
        free(s->deferred);
        if (owner) /* in a forked child the lock may be held by a thread that is gone */
            pthread_mutex_destroy(&s->lock);
    }
}
